"""The allocation methods, one folder each (`config.py`: pydantic only; `method.py`: torch), listed in registry.py.

Kept free of imports: `ds_dynrank.config` reads every method's `config.py` and must not load torch.
"""
