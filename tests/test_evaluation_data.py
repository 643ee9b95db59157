"""The Evaluator's data API (examples, batches, logits, hooks, Grams, per-example
gradients, Fisher) against answers computed by hand.

Evaluators here use the default device (get_device honours $MERGESCOPE_DEVICE),
so the same checks run on a GPU; hand computations run where the data are.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from analysis.errors import ValidationError
from analysis.evaluation import Evaluator, FeatureSplit, Head, features, pooled_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _linear_evaluator(n=40, d_in=5, classes=3, bias=True, batch_size=16, seed=0):
    """A single nn.Linear backbone (features = W x + b) with an identity head: logits = W x + b."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, classes, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, d_in, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(classes, generator=g))
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    data = {"t": {"train": FeatureSplit(x, y)}}
    head = Head(torch.eye(classes), torch.zeros(classes))
    return Evaluator(lin, data, {"t": head}, batch_size=batch_size), x, y


# ---------------------------------------------------------------- examples / batches / logits
def test_examples_are_a_fixed_sorted_seeded_subset():
    ev, x, _ = _linear_evaluator(n=40)
    a = ev.examples("t", n=10, seed=3)
    assert a.dtype == torch.long and len(a) == 10 and torch.equal(a, a.sort().values)
    assert torch.equal(a, ev.examples("t", n=10, seed=3))
    assert not torch.equal(a, ev.examples("t", n=10, seed=4))
    assert torch.equal(ev.examples("t"), torch.arange(40))
    assert torch.equal(ev.examples("t", n=1000), torch.arange(40))
    with pytest.raises(ValidationError, match=r"'t'.*'validation'"):
        ev.examples("t", split="validation")
    with pytest.raises(ValidationError, match="nope"):
        ev.examples("nope")


def test_batches_cover_the_subset_on_the_device():
    ev, x, y = _linear_evaluator(n=40, batch_size=16)
    seen_x, seen_y = [], []
    for inputs, labels, mask in ev.batches("t", n=25, seed=1, batch_size=8):
        assert mask is None and inputs.device.type == ev.device.type and len(inputs) <= 8
        seen_x.append(inputs.cpu())
        seen_y.append(labels.cpu())
    idx = ev.examples("t", n=25, seed=1)
    assert torch.equal(torch.cat(seen_x), x[idx]) and torch.equal(torch.cat(seen_y), y[idx])


def test_logits_take_partial_params_and_are_differentiable():
    ev, x, _ = _linear_evaluator(bias=True)
    w = torch.randn(3, 5, requires_grad=True)
    out = ev.logits(x.to(ev.device), "t", {"weight": w})  # bias comes from the base
    expect = x @ w.detach().T + ev.backbone.bias.detach().cpu()
    torch.testing.assert_close(out.detach().cpu(), expect)
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(3, 5))


def test_features_pools_only_sequence_outputs():
    class Seq(nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids.float().unsqueeze(-1).expand(-1, -1, 2)  # a bare 3-D tensor

    ids = torch.tensor([[1, 3, 9], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    pooled = features(Seq(), {"input_ids": ids, "attention_mask": mask})
    assert torch.equal(pooled, torch.tensor([[13 / 3, 13 / 3], [4.0, 4.0]]))
    assert torch.equal(pooled_features(Seq(), ids, mask), pooled)
    flat = torch.randn(4, 3)
    assert torch.equal(features(nn.Identity(), flat), flat)  # 2-D: already pooled


# ---------------------------------------------------------------- hooks
def test_hooks_see_swapped_params_and_are_always_removed():
    ev, x, _ = _linear_evaluator()
    seen = []
    w = torch.zeros(3, 5)
    ev.forward_with_hooks(x.to(ev.device), "t", {"weight": w},
                          hooks={"": lambda m, args, out: seen.append(out.detach().cpu())})
    torch.testing.assert_close(seen[0], ev.backbone.bias.detach().cpu().expand(40, 3))  # W = 0 was used
    assert not ev.backbone._forward_hooks

    def boom(module, args, out):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        ev.forward_with_hooks(x.to(ev.device), "t", hooks={"": boom})
    assert not ev.backbone._forward_hooks
    with pytest.raises(ValidationError, match="no_such"):
        ev.forward_with_hooks(x.to(ev.device), "t", hooks={"": boom, "no_such": boom})
    assert not ev.backbone._forward_hooks


def test_toy_backbone_hooks_removed_with_functional_call(tiny_workspace, _toy):
    ev = tiny_workspace.evaluator
    _, finetuned, data, _ = _toy
    x = data["alpha"]["train"].inputs[:4].to(ev.device)
    outs = {}
    with pytest.raises(KeyError):
        with ev.hooked({"encoder.layer.1.dense": lambda m, a, o: outs.update(h=o.detach())}):
            ev.logits(x, "alpha", finetuned["alpha"])
            raise KeyError("caller failure inside the block")
    assert "h" in outs
    assert all(not m._forward_hooks for m in ev.backbone.modules())


# ---------------------------------------------------------------- Grams
def test_gram_of_a_linear_on_feature_data_is_xtx():
    ev, x, _ = _linear_evaluator(n=40, batch_size=16)  # three batches
    grams, rows = ev.linear_input_grams("t", n=None)
    assert list(grams) == ["weight"] and rows == {"weight": 40}
    assert grams["weight"].dtype == torch.float64 and grams["weight"].device.type == "cpu"
    xd = x.double()
    torch.testing.assert_close(grams["weight"], xd.T @ xd, rtol=0, atol=1e-10)
    idx = ev.examples("t", n=7, seed=2)
    sub, rows = ev.linear_input_grams("t", n=7, seed=2)
    torch.testing.assert_close(sub["weight"], xd[idx].T @ xd[idx], rtol=0, atol=1e-10)
    assert rows["weight"] == 7


def test_gram_names_select_and_reject(tiny_workspace):
    ev = tiny_workspace.evaluator
    grams, rows = ev.linear_input_grams("beta", names=["encoder.layer.1.dense.weight"])
    assert list(grams) == ["encoder.layer.1.dense.weight"] and grams["encoder.layer.1.dense.weight"].shape == (16, 16)
    assert rows == {"encoder.layer.1.dense.weight": 96}
    with pytest.raises(ValidationError, match="encoder.norm.weight"):
        ev.linear_input_grams("beta", names=["encoder.norm.weight"])


def test_toy_gram_of_second_layer_uses_params(tiny_workspace, _toy):
    """Input of layer 1 = tanh(W0 x + b0), at the parameters passed in."""
    ev = tiny_workspace.evaluator
    _, finetuned, data, _ = _toy
    p = finetuned["gamma"]
    grams, _ = ev.linear_input_grams("gamma", split="validation", n=None, params=p)
    x = data["gamma"]["validation"].inputs.double()
    h = torch.tanh(x @ p["encoder.layer.0.dense.weight"].double().T + p["encoder.layer.0.dense.bias"].double())
    torch.testing.assert_close(grams["encoder.layer.0.dense.weight"], x.T @ x, rtol=0, atol=1e-10)
    torch.testing.assert_close(grams["encoder.layer.1.dense.weight"], h.T @ h, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def demo(tiny_demo_dir):
    from analysis.zoo import load_demo
    return load_demo(tiny_demo_dir)


def test_token_gram_excludes_padding(demo):
    """Each example alone, trimmed to its own length, through a hand-set hook: same Grams and row counts."""
    ev = demo.evaluator
    task = demo.tasks[0]
    data = ev.data[task]["train"]
    idx = ev.examples(task, n=24, seed=0)
    lengths = data.lengths()[idx]
    assert lengths.min() < lengths.max()  # padding is there to exclude
    first = next(m for m, mod in ev.backbone.named_modules() if isinstance(mod, nn.Linear))
    names = [f"{first}.weight", "encoder.layer.1.output.dense.weight"]
    grams, rows = ev.linear_input_grams(task, n=24, seed=0, names=names)
    assert rows == {k: int(lengths.sum()) for k in names}

    expect = {k: 0 for k in names}
    current = {}
    handles = [ev.backbone.get_submodule(k.removesuffix(".weight")).register_forward_hook(
        lambda m, a, o, k=k: current.update({k: a[0].detach().double().reshape(-1, a[0].shape[-1])}))
        for k in names]
    try:
        with torch.no_grad():
            for i in idx.tolist():
                n_tok = int(data.attention_mask[i].sum())
                ev.backbone(input_ids=data.input_ids[i:i + 1, :n_tok].to(ev.device),
                            attention_mask=data.attention_mask[i:i + 1, :n_tok].to(ev.device))
                for k in names:
                    expect[k] = expect[k] + (current[k].T @ current[k]).cpu()
    finally:
        for h in handles:
            h.remove()
    for k in names:
        torch.testing.assert_close(grams[k], expect[k], rtol=1e-4, atol=1e-4)
    # and the padding rows would have changed the answer
    with torch.no_grad():
        handle = ev.backbone.get_submodule(first).register_forward_hook(
            lambda m, a, o: current.update(pad=a[0].detach().double().reshape(-1, a[0].shape[-1])))
        try:
            ev.backbone(input_ids=data.input_ids[idx].to(ev.device), attention_mask=data.attention_mask[idx].to(ev.device))
        finally:
            handle.remove()
        with_padding = (current["pad"].T @ current["pad"]).cpu()
    assert not torch.allclose(with_padding, grams[names[0]], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- gradients and Fisher
def test_fisher_of_logistic_regression_is_the_analytic_mean_of_squared_grads():
    """logits = W x: d log p(y|x) / dW = (onehot(y) - softmax(W x)) x^T."""
    ev, x, y = _linear_evaluator(n=30, bias=False)
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))  # evaluated away from the base
    for params, wt in ((None, ev.backbone.weight.detach().cpu()), ({"weight": w}, w)):
        r = torch.nn.functional.one_hot(y, 3).double() - torch.softmax(x.double() @ wt.double().T, 1)
        per_example = r[:, :, None] * x.double()[:, None, :]  # (N, C, D)
        fisher = ev.fisher_diagonal("t", n=None, params=params)
        assert list(fisher) == ["weight"] and fisher["weight"].dtype == torch.float32
        torch.testing.assert_close(fisher["weight"].double(), (per_example ** 2).mean(0), rtol=1e-5, atol=1e-7)
        idx = ev.examples("t", n=12, seed=5)
        sub = ev.fisher_diagonal("t", n=12, seed=5, params=params)
        torch.testing.assert_close(sub["weight"].double(), (per_example[idx] ** 2).mean(0), rtol=1e-5, atol=1e-7)


def test_per_example_grads_match_autograd_on_the_toy(tiny_workspace, _toy):
    ev = tiny_workspace.evaluator
    _, finetuned, data, heads = _toy
    p = finetuned["alpha"]
    names = ["encoder.layer.0.dense.weight", "encoder.norm.weight"]
    idx = ev.examples("alpha", n=6, seed=2)
    grads = list(ev.per_example_grads("alpha", n=6, seed=2, params=p, names=names))
    assert len(grads) == 6 and all(list(g) == names for g in grads)
    split = data["alpha"]["train"]
    backbone = copy.deepcopy(ev.backbone).cpu()
    for g, i in zip(grads, idx.tolist()):
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in p.items()}
        logits = functional_call(backbone, leaves, (split.inputs[i:i + 1],)) @ heads["alpha"].weight.T
        logp = -torch.nn.functional.cross_entropy(logits + heads["alpha"].bias, split.labels[i:i + 1])
        expect = torch.autograd.grad(logp, [leaves[k] for k in names])
        for k, e in zip(names, expect):
            assert g[k].device.type == "cpu"
            torch.testing.assert_close(g[k], e, rtol=1e-5, atol=1e-6)


def test_per_example_grads_match_autograd_on_bert(demo):
    ev = demo.evaluator
    task = demo.tasks[1]
    data = ev.data[task]["train"]
    head = ev.heads[task]
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.1.output.LayerNorm.bias"]
    idx = ev.examples(task, n=3, seed=1)
    for g, i in zip(ev.per_example_grads(task, n=3, seed=1, names=names), idx.tolist()):
        n_tok = int(data.attention_mask[i].sum())
        leaves = {k: dict(ev.backbone.named_parameters())[k].detach().clone().requires_grad_(True) for k in names}
        feats = pooled_features(ev.backbone, data.input_ids[i:i + 1, :n_tok].to(ev.device),
                                data.attention_mask[i:i + 1, :n_tok].to(ev.device), leaves)
        logp = -torch.nn.functional.cross_entropy(feats @ head.weight.T + head.bias, data.labels[i:i + 1].to(ev.device))
        expect = torch.autograd.grad(logp, list(leaves.values()))
        for k, e in zip(names, expect):
            # float32 rounding: both this and the evaluator's (chunked, padded) route are ~1e-6 of
            # the largest entry away from a float64 gradient
            torch.testing.assert_close(g[k], e.cpu(), rtol=1e-4, atol=1e-5 * float(e.abs().max()))
    assert not any(p.requires_grad for p in ev.backbone.parameters())  # the base stays frozen
    with pytest.raises(ValidationError, match="classifier"):
        next(ev.per_example_grads(task, n=1, names=["classifier.weight"]))


# ---------------------------------------------------------------- fast (vmap) per-example gradients
def _assert_same_up_to_rounding(fast: dict, loop: dict, rel: float = 1e-5):
    """Every tensor within `rel` of its own largest entry (floored at 1e-3 of the largest entry
    overall: attention key biases have a zero gradient in exact arithmetic, float32 noise)."""
    assert list(fast) == list(loop)
    scale = max(float(v.abs().max()) for v in loop.values())
    assert scale > 0
    for k, ref in loop.items():
        assert fast[k].dtype == torch.float32 and fast[k].device.type == "cpu" and fast[k].shape == ref.shape
        err = float((fast[k] - ref).abs().max())
        assert err <= rel * max(float(ref.abs().max()), 1e-3 * scale), (k, err, float(ref.abs().max()))


def _loop(ev, fn, *args, **kwargs):
    """`fn` with the one-example loop (the reference), leaving the evaluator as it was."""
    ev.fast_grads = False
    try:
        return fn(*args, **kwargs)
    finally:
        ev.fast_grads = True


def test_fast_fisher_equals_the_loop_on_tiny_bert(demo):
    """Padded, length-sorted chunks through vmap (4-D mask, word-embedding rows, δᵀx for
    nn.Linear weights), at the base and at a fine-tuned point, several chunks per call."""
    from analysis.statistics import model_point
    ev = demo.evaluator
    task = demo.tasks[0]
    lengths = ev.data[task]["train"].lengths()
    assert lengths.min() < lengths.max()  # padding inside chunks
    batch_size = ev.batch_size
    ev.batch_size = 16  # several chunks of mixed lengths
    try:
        for params in (None, model_point(demo.tvs, task, ev.device)):
            ev._grad_routes.clear()
            fast = ev.fisher_diagonal(task, n=None, params=params)
            route = ev._grad_routes[("EncodedSplit", tuple(dict(ev.backbone.named_parameters())))]
            assert route is not None and route.linears and route.mask == "4d"
            assert list(route.rows.values()) == ["embeddings.word_embeddings.weight"]
            _assert_same_up_to_rounding(fast, _loop(ev, ev.fisher_diagonal, task, n=None, params=params))
        # a subset of names, a seeded subset of examples
        names = ["embeddings.word_embeddings.weight", "encoder.layer.1.attention.self.value.weight",
                 "embeddings.position_embeddings.weight", "encoder.layer.0.output.LayerNorm.weight"]
        fast = ev.fisher_diagonal(task, n=40, seed=3, names=names)
        _assert_same_up_to_rounding(fast, _loop(ev, ev.fisher_diagonal, task, n=40, seed=3, names=names))
    finally:
        ev.batch_size = batch_size


def test_fast_per_example_grads_equal_the_loop_in_example_order_on_tiny_bert(demo):
    ev = demo.evaluator
    task = demo.tasks[2]
    idx = ev.examples(task, n=12, seed=4)
    assert len(set(ev.data[task]["train"].lengths()[idx].tolist())) > 1
    batch_size = ev.batch_size
    ev.batch_size = 5  # chunks in data order, each padded to its longest example
    try:
        fast = list(ev.per_example_grads(task, n=12, seed=4))
    finally:
        ev.batch_size = batch_size
    loop = list(_loop(ev, ev.per_example_grads, task, n=12, seed=4))
    assert len(fast) == len(loop) == 12
    for f, l in zip(fast, loop):
        _assert_same_up_to_rounding(f, l)


def test_padding_does_not_change_a_fast_gradient(demo):
    """One example alone at its own width, and inside a chunk padded to the split's full width."""
    ev = demo.evaluator
    task = demo.tasks[1]
    data = ev.data[task]["train"]
    i = int(torch.argmin(data.lengths()))
    assert int(data.lengths()[i]) < data.input_ids.shape[1]
    names, values, given = ev._grad_leaves(None, None)
    route = ev._grad_route(task, data, torch.tensor([i]), values, given, names)
    assert route is not None
    on = lambda batch: {k: v.to(ev.device) for k, v in batch.items()}   # noqa: E731  (the data stays on the CPU)
    own = on(data.batch(torch.tensor([i]))[0])
    padded = on({"input_ids": data.input_ids[i:i + 1], "attention_mask": data.attention_mask[i:i + 1]})
    label = data.labels[i:i + 1].to(ev.device)
    a = ev._vmap_chunk(task, own, label, values, given, names, route)
    b = ev._vmap_chunk(task, padded, label, values, given, names, route)
    _assert_same_up_to_rounding({k: b.example(k, 0).cpu() for k in names}, {k: a.example(k, 0).cpu() for k in names})


def test_fast_grads_equal_the_loop_on_the_toy_feature_module(tiny_workspace, _toy):
    ev = tiny_workspace.evaluator
    _, finetuned, _, _ = _toy
    p = finetuned["beta"]
    fast = ev.fisher_diagonal("beta", n=None, params=p)
    route = ev._grad_routes[("FeatureSplit", tuple(dict(ev.backbone.named_parameters())))]
    assert route is not None and route.linears and route.mask is None
    _assert_same_up_to_rounding(fast, _loop(ev, ev.fisher_diagonal, "beta", n=None, params=p))
    ev.batch_size = 7
    fast = list(ev.per_example_grads("gamma", n=20, seed=1, params=p, names=["encoder.layer.1.dense.weight",
                                                                              "encoder.norm.weight"]))
    loop = list(_loop(ev, ev.per_example_grads, "gamma", n=20, seed=1, params=p,
                      names=["encoder.layer.1.dense.weight", "encoder.norm.weight"]))
    assert len(fast) == 20
    for f, l in zip(fast, loop):
        _assert_same_up_to_rounding(f, l)


class _Branchy(nn.Module):
    """A backbone vmap cannot batch: Python control flow on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(5, 4)

    def forward(self, x):
        h = self.dense(x)
        return h if bool(h.sum() > 0) else -h


def _count_vmap_chunks(ev, monkeypatch, fail_after=None):
    calls = []
    original = ev._vmap_chunk

    def counted(*args, **kwargs):
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)
    monkeypatch.setattr(ev, "_vmap_chunk", counted)
    return calls


def test_a_backbone_vmap_cannot_batch_falls_back_to_the_loop_once(monkeypatch, recwarn):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    ev = Evaluator(_Branchy(), {"t": {"train": FeatureSplit(x, y)}}, {"t": Head(torch.randn(3, 4, generator=g),
                                                                                torch.zeros(3))})
    calls = _count_vmap_chunks(ev, monkeypatch)
    fisher = ev.fisher_diagonal("t", n=None)  # no error
    assert ev._grad_routes == {("FeatureSplit", ("dense.weight", "dense.bias")): None}
    tried = len(calls)
    assert tried >= 1
    # the answer is the loop's, by hand: per-example autograd
    expect = {k: torch.zeros_like(v, device="cpu") for k, v in ev.backbone.named_parameters()}   # Fishers are on the CPU
    for i in range(30):
        params = {k: v.detach().clone().requires_grad_(True) for k, v in ev.backbone.named_parameters()}
        logits = functional_call(ev.backbone, params, (x[i:i + 1].to(ev.device),)) @ ev.heads["t"].weight.T
        logp = -torch.nn.functional.cross_entropy(logits + ev.heads["t"].bias, y[i:i + 1].to(ev.device))
        for k, gr in zip(params, torch.autograd.grad(logp, list(params.values()))):
            expect[k] += gr.cpu() ** 2 / 30
    for k in expect:
        torch.testing.assert_close(fisher[k], expect[k], rtol=1e-5, atol=1e-7)
    ev.fisher_diagonal("t", n=10)
    list(ev.per_example_grads("t", n=3))
    assert len(calls) == tried  # decided once: vmap is not tried again
    assert not [w for w in recwarn if "vmap" in str(w.message) or "batching rule" in str(w.message)]


def test_fast_grads_false_never_uses_vmap(tiny_workspace, monkeypatch):
    ev = tiny_workspace.evaluator
    ev.fast_grads = False
    calls = _count_vmap_chunks(ev, monkeypatch)
    ev.fisher_diagonal("alpha", n=10)
    list(ev.per_example_grads("alpha", n=2))
    assert not calls and not ev._grad_routes


def test_a_padding_leak_is_caught_and_the_loop_answers():
    """A token backbone that pools over every position, padding included: padded chunks would
    change the answer, so the route check rejects vmap and the loop (own lengths) answers."""
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.dense = nn.Linear(6, 6)

        def forward(self, input_ids, attention_mask):
            return torch.tanh(self.dense(self.emb(input_ids))).mean(1)  # ignores the mask

    from analysis.evaluation import EncodedSplit
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 7, (24,), generator=g)
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 20, (24, 6), generator=g) * mask
    data = {"t": {"train": EncodedSplit(ids, mask, torch.randint(0, 2, (24,), generator=g))}}
    ev = Evaluator(Leaky(), data, {"t": Head(torch.randn(2, 6, generator=g), torch.zeros(2))})
    fisher = ev.fisher_diagonal("t", n=None)
    assert list(ev._grad_routes.values()) == [None]
    expect = _loop(ev, ev.fisher_diagonal, "t", n=None)
    for k in expect:
        assert torch.equal(fisher[k], expect[k])


def test_a_failure_after_the_route_check_finishes_with_the_loop(tiny_workspace, monkeypatch):
    ev = tiny_workspace.evaluator
    ev.batch_size = 10
    calls = _count_vmap_chunks(ev, monkeypatch, fail_after=3)  # route check, two chunks, then a failure
    fisher = ev.fisher_diagonal("alpha", n=None)
    assert len(calls) == 4 and list(ev._grad_routes.values()) == [None]
    _assert_same_up_to_rounding(fisher, _loop(ev, ev.fisher_diagonal, "alpha", n=None))
    grads = list(ev.per_example_grads("alpha", n=5))  # and the loop from now on
    assert len(calls) == 4 and len(grads) == 5


def test_a_plain_token_backbone_takes_the_2d_mask_and_keeps_the_padding_row_at_zero():
    """nn.Embedding(padding_idx=0) gives row 0 no gradient, also where a real token has id 0;
    repeated ids within an example sum before squaring."""
    class MaskedTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 6, padding_idx=0)
            self.dense = nn.Linear(6, 6)

        def forward(self, input_ids, attention_mask):
            return torch.tanh(self.dense(self.emb(input_ids)))  # token states, pooled over the mask

    from analysis.evaluation import EncodedSplit
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(3, 9, (30,), generator=g)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    ids = torch.randint(0, 4, (30, 8), generator=g) * mask  # few ids: repeats, and real tokens with id 0
    assert ((ids == 0) & (mask == 1)).any()
    data = {"t": {"train": EncodedSplit(ids, mask, torch.randint(0, 2, (30,), generator=g))}}
    ev = Evaluator(MaskedTokens(), data, {"t": Head(torch.randn(2, 6, generator=g), torch.zeros(2))}, batch_size=8)
    fisher = ev.fisher_diagonal("t", n=None)
    route = list(ev._grad_routes.values())[0]
    assert route is not None and route.mask == "2d" and route.rows == {"emb": "emb.weight"} and route.linears
    assert not fisher["emb.weight"][0].any()
    _assert_same_up_to_rounding(fisher, _loop(ev, ev.fisher_diagonal, "t", n=None))
    for f, l in zip(ev.per_example_grads("t", n=9), _loop(ev, ev.per_example_grads, "t", n=9)):
        _assert_same_up_to_rounding(f, l)
