"""Built-in plugins, registered through the plugin manager exactly like third-party ones
(`ernie_serve.core.plugins.DEFAULT_PLUGINS`): the schedulers, and ERNIE's web-search prompt."""
