"""The pure core: formulas, key sets, packing, scorer, diagnostics, settings and the report; no ms-swift and no
transformers import."""
