"""ONNX export of ERNIE 4.5 and its execution with onnxruntime (`--backend onnx`).

`graph.py` builds the graph, `export.py` writes and caches exports (and implements `ernie-serve export onnx`),
`backend.py` runs them, `plugin.py` registers the backend. Needs `pip install 'ernie-serve[onnx]'`.
"""
