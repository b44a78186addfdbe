"""Networks of the project's own, for `model.names` entries `package.module:function` (see docs/recipe.md, "Your own
network"). Importable from the repository root: `distrain/run.py` puts the root on `sys.path`; elsewhere (the
`distrain` console script, a serving host) put it on PYTHONPATH or install it. Not part of the `distrain` package."""
