"""The shipped backend conformance suite, run for every built-in backend."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.testing.conformance import BackendConformance, ConformanceError, conformance_cases, run_conformance

BACKENDS = ["torch", "onnx"]


@pytest.fixture(scope="module")
def suites(tiny_checkpoint, tmp_path_factory):
    """One suite per backend, sharing the session's tiny checkpoints; engines are reused across cases."""
    made: dict[str, BackendConformance] = {}

    def get(backend: str) -> BackendConformance:
        if backend not in made:
            if backend == "onnx":
                pytest.importorskip("onnxruntime", reason="the onnx backend needs pip install 'ernie-serve[onnx]'")
            made[backend] = BackendConformance(
                backend,
                tmp_path_factory.mktemp(f"conformance-{backend}"),
                checkpoints=lambda shape: tiny_checkpoint(shape, torch.bfloat16),
            )
        return made[backend]

    yield get
    for suite in made.values():
        suite.close()


@pytest.mark.parametrize("case", conformance_cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_conformance(suites, backend: str, case: str) -> None:
    suites(backend).run_case(case)


def test_case_names_cover_every_tiny_shape() -> None:
    from ernie_serve.testing.checkpoints import TINY_SHAPES

    cases = conformance_cases()
    assert [c for c in cases if c.startswith("greedy_parity[")] == [f"greedy_parity[{s}]" for s in TINY_SHAPES]
    assert {"mixed_batching", "abort", "preemption", "seeded_sampling"} <= set(cases)
    assert conformance_cases(["dense_bias_headdim"])[0] == "greedy_parity[dense_bias_headdim]"


def test_unknown_case_is_named(suites) -> None:
    with pytest.raises(KeyError, match="unknown conformance case 'nope'"):
        suites("torch").run_case("nope")


def test_a_wrong_backend_fails_with_the_case_named(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """A backend whose logits are off must fail parity, with a message naming the backend and the case."""
    from ernie_serve.backends.torch.backend import TorchBackend
    from ernie_serve.core import plugins

    class SkewedBackend(TorchBackend):
        name = "skewed"

        def execute(self, plan):
            logits = super().execute(plan)
            return logits + torch.linspace(0, 50, logits.shape[-1])  # favours high token ids

    registry = plugins.registry()
    registration = plugins.Registration("skewed", SkewedBackend, "test", None, None)
    monkeypatch.setitem(registry.backends, "skewed", registration)
    with pytest.raises(ConformanceError) as failure:
        run_conformance(
            "skewed",
            tmp_path,
            cases=["greedy_parity[dense_bias_headdim]", "abort"],
            checkpoints=lambda shape: tiny_checkpoint(shape, torch.bfloat16),
        )
    message = str(failure.value)
    assert "failed 1 of 2 conformance cases" in message
    assert "backend 'skewed', greedy_parity[dense_bias_headdim]: prompt 0" in message


def test_a_crashing_backend_fails_every_case_it_crashes_in(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    from ernie_serve.backends.torch.backend import TorchBackend
    from ernie_serve.core import plugins

    class CrashingBackend(TorchBackend):
        name = "crashing"

        def execute(self, plan):
            if len(plan.scheduled) > 1:
                raise RuntimeError("batches are not implemented")
            return super().execute(plan)

    registration = plugins.Registration("crashing", CrashingBackend, "test", None, None)
    monkeypatch.setitem(plugins.registry().backends, "crashing", registration)
    with pytest.raises(ConformanceError) as failure:
        run_conformance(
            "crashing",
            tmp_path,
            cases=["mixed_batching", "abort"],
            checkpoints=lambda shape: tiny_checkpoint(shape, torch.bfloat16),
        )
    message = str(failure.value)
    assert "failed 2 of 2" in message
    failed = "the engine failed the request (finish reason 'error'; the log has the backend's traceback)"
    assert f"backend 'crashing', mixed_batching: prompt 0: {failed}" in message, message


def test_a_backend_that_ignores_is_new_fails_preemption(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """A backend that keeps a preempted request's old block table (ignoring `release` and `is_new`, appending
    the new table to the stale one) passes the cases without preemption but must fail `preemption`."""
    from ernie_serve.backends.torch.backend import TorchBackend
    from ernie_serve.core import plugins

    class StaleTablesBackend(TorchBackend):
        name = "stale"

        def release(self, request_ids):
            pass

        def execute(self, plan):
            for item in plan.scheduled:
                if item.is_new and item.request_id in self._tables:
                    item.is_new = False  # a readmitted request continues its stale table
            return super().execute(plan)

    registration = plugins.Registration("stale", StaleTablesBackend, "test", None, None)
    monkeypatch.setitem(plugins.registry().backends, "stale", registration)
    with pytest.raises(ConformanceError) as failure:
        run_conformance(
            "stale",
            tmp_path,
            cases=["greedy_parity[moe_shared_tied]", "preemption"],
            checkpoints=lambda shape: tiny_checkpoint(shape, torch.bfloat16),
        )
    message = str(failure.value)
    assert "failed 1 of 2 conformance cases" in message
    assert "backend 'stale', preemption: " in message
