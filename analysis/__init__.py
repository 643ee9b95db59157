"""mergescope's engine: loading, spectra, interference, merging, alignment.

Never imports streamlit; the pages are thin views over this package.
"""
