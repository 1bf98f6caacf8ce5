"""What `ernie-serve plugins` prints: every registration with the plugin and distribution it came from, each
backend's availability, capabilities and options, and the plugins that were skipped.

Reads `ernie_serve.core.plugins.registry()`; core only records provenance, the wording lives here.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, TextIO

from ernie_serve.cli_options import field_to_flag
from ernie_serve.core.backend import Backend, BackendCapabilities
from ernie_serve.core.plugins import PluginInfo, Registration, Registry


def availability(backend_cls: type[Backend]) -> str | None:
    """`backend_cls.availability()`, guarded: None when it can run here, else the reason it cannot."""
    try:
        return backend_cls.availability()
    except Exception as exc:  # the contract says it must not raise; a plugin bug still must not crash the listing
        return f"availability check failed: {type(exc).__name__}: {exc}"


def option_flags(backend_cls: type[Backend]) -> list[str]:
    """The flags of the backend's own options (`options_class` fields), e.g. ["--onnx-providers"]."""
    return [field_to_flag(name) for name in backend_cls.options_class.model_fields]


def describe_capabilities(caps: BackendCapabilities) -> str:
    """One line, e.g. "prefix caching: yes; quantization: wint8, wint4; tensor parallel: no; devices: cpu"."""
    return "; ".join(
        [
            f"prefix caching: {'yes' if caps.prefix_caching else 'no'}",
            f"quantization: {', '.join(caps.quantization) or 'none'}",
            f"tensor parallel: {'yes' if caps.tensor_parallel else 'no'}",
            f"devices: {', '.join(caps.devices) or 'none'}",
        ]
    )


def parallel_layout(backend_cls: type[Backend]) -> list[str]:
    """The backend's optional `parallel_layout()` lines (how it splits a model over ranks), guarded like
    `availability`; none for backends without it or without tensor parallelism."""
    describe = getattr(backend_cls, "parallel_layout", None)
    if not backend_cls.capabilities.tensor_parallel or describe is None:
        return []
    try:
        return list(describe())
    except Exception as exc:
        return [f"parallel layout unavailable: {type(exc).__name__}: {exc}"]


def source(item: Registration[Any] | PluginInfo) -> str:
    """Where a registration or plugin comes from: "ernie-serve 0.1.0 [torch]" (distribution, version, plugin)."""
    dist = f"{item.distribution} {item.version or '?'}" if item.distribution else "unknown distribution"
    plugin = item.provider if isinstance(item, Registration) else item.name
    return f"{dist} [{plugin}]"


def plugins_json(reg: Registry) -> dict[str, Any]:
    """The `ernie-serve plugins --json` document."""

    def item(r: Registration[Any], **more: Any) -> dict[str, Any]:
        obj = r.obj
        qualname = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
        return {
            "name": r.name,
            "object": qualname,
            "provider": r.provider,
            "distribution": r.distribution,
            "version": r.version,
            **more,
        }

    def plugin(p: PluginInfo) -> dict[str, Any]:
        return {**asdict(p), "builtin": p.builtin}

    backends = []
    for r in reg.backends.values():
        reason = availability(r.obj)
        options = [
            {"name": name, "flag": field_to_flag(name), "help": info.description}
            for name, info in r.obj.options_class.model_fields.items()
        ]
        backends.append(
            item(
                r,
                available=reason is None,
                reason=reason,
                capabilities=asdict(r.obj.capabilities),
                options=options,
                parallel_layout=parallel_layout(r.obj),
            )
        )
    return {
        "backends": backends,
        "schedulers": [item(r) for r in reg.schedulers.values()],
        "models": [item(r) for r in reg.models.values()],
        "grammar_backends": [item(r) for r in reg.grammar_backends.values()],
        "gateway_routes": [item(r) for r in reg.gateway_routes],
        "request_transforms": [item(r) for r in reg.request_transforms.values()],
        "parsers": [item(r) for r in reg.parsers.values()],  # names are "kind:name", e.g. "reasoning:ernie45"
        "plugins": [plugin(p) for p in reg.plugins],
        "failed_plugins": [plugin(p) for p in reg.failures],
    }


def _table(out: TextIO, title: str, rows: list[tuple[str, ...]], details: list[list[str]] | None = None) -> None:
    """Aligned columns (the last one is free text); `details[i]` are lines printed under row i, aligned with its
    second column."""
    out.write(f"{title}:\n")
    if not rows:
        out.write("  (none)\n")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for i, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)] + [row[-1]]
        out.write("  " + "  ".join(cells).rstrip() + "\n")
        for line in details[i] if details else []:
            out.write(" " * (4 + widths[0]) + line + "\n")


def write_report(reg: Registry, out: TextIO) -> None:
    """The `ernie-serve plugins` tables: backends (with availability, capabilities and option flags),
    schedulers, models, grammar backends, plugin routes and transforms, output parsers, the plugins that loaded,
    and those that were skipped."""
    backend_rows, backend_details = [], []
    for r in reg.backends.values():
        reason = availability(r.obj)
        backend_rows.append((r.name, source(r), "available" if reason is None else f"unavailable: {reason}"))
        flags = option_flags(r.obj)
        backend_details.append(
            [describe_capabilities(r.obj.capabilities), f"options: {', '.join(flags) if flags else 'none'}"]
            + parallel_layout(r.obj)
        )
    _table(out, "Backends", backend_rows, backend_details)
    _table(out, "Schedulers", [(r.name, source(r)) for r in reg.schedulers.values()])
    _table(out, "Models (torch backend architectures)", [(r.name, source(r)) for r in reg.models.values()])
    _table(out, "Grammar backends (structured output)", [(r.name, source(r)) for r in reg.grammar_backends.values()])
    if reg.gateway_routes:
        _table(out, "Gateway routes", [(r.name, source(r)) for r in reg.gateway_routes])
    if reg.request_transforms:
        _table(out, "Request transforms", [(r.name, source(r)) for r in reg.request_transforms.values()])
    if reg.parsers:  # "reasoning:NAME" is what --reasoning-parser NAME selects, "tool_call:NAME" --tool-call-parser
        _table(out, "Output parsers (kind:name)", [(r.name, source(r)) for r in reg.parsers.values()])
    plugin_rows = [(p.name, source(p), p.module + (" (built-in)" if p.builtin else "")) for p in reg.plugins]
    _table(out, "Plugins (entry points in group ernie_serve, in load order)", plugin_rows)
    if reg.failures:
        _table(out, "Failed plugins (skipped)", [(p.name, source(p), p.error or "") for p in reg.failures])
