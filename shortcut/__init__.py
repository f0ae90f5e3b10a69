"""shortcut: test the layerwise attention shortcut (Verma & Pilanci, arXiv 2409.10870) against a same-size GPT.

Pipeline: prepare -> data -> model -> train -> evaluate. `shortcut.cli` is the command-line front end.
"""

__version__ = "0.1.0"
