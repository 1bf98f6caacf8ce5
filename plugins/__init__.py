"""Built-in plugins, declared as entry points in ernie-serve's pyproject.toml and loaded exactly like
third-party ones: the schedulers (`schedulers`) and ERNIE's web-search prompt (`web_search`)."""
