"""``python -m ptv2_kernels``: the report, the self-check, and that a backend that disagrees makes it fail."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import __main__ as cli
from ptv2_kernels import backends

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _run_cli(*args, env_drop=()):
    env = {key: value for key, value in os.environ.items() if key not in env_drop}
    return subprocess.run([sys.executable, "-m", "ptv2_kernels", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_import_does_not_import_triton():
    code = "import sys, ptv2_kernels; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "import ptv2_kernels imported triton"


def test_cli_reference_passes_and_reports():
    result = _run_cli("--backend", "reference")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"ptv2_kernels {ptv2_kernels.__version__}" in out
    assert f"torch   {torch.__version__}" in out
    assert "Python  " in out and "triton  " in out
    device = "no CUDA device" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    assert device in out
    for name in backends.NAMES:
        assert f"  {name} " in out
    if backends.unavailable_reason("cuda") is not None:
        assert "cuda       not available: " in out
    # A line per checked quantity of each case in each dtype.
    lines = [line for line in out.splitlines() if "max error" in line]
    dtypes = 2 if torch.cuda.is_available() else 1
    assert len(lines) == sum(_quantities(case) for case in cli.CASES) * dtypes
    assert all(line.rstrip().endswith("PASS") for line in lines)
    assert out.rstrip().endswith("result: PASS (reference)")


def _quantities(case):
    """out, lse, the five gradients, and one more per optional differentiable input the case has."""
    made = case.make(torch.float32, "cpu", torch.Generator().manual_seed(0))
    return len(cli.QUANTITIES) + sum(key in made for key in cli._OPTIONAL_TENSORS)


def test_cli_quick_runs_fewer_cases():
    result = _run_cli("--backend", "reference", "--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "max error" in line]
    quick_cases = [case for case in cli.CASES if case.quick]
    assert 0 < len(quick_cases) < len(cli.CASES)
    assert len(lines) == sum(_quantities(case) for case in quick_cases) * (2 if torch.cuda.is_available() else 1)


@pytest.mark.skipif(backends.unavailable_reason("cuda") is None, reason="the CUDA backend is available here")
def test_cli_requested_backend_unavailable_fails():
    result = _run_cli("--backend", "cuda")
    assert result.returncode == 1
    assert "requested backend(s) not available here: cuda" in result.stdout


def test_cli_rejects_unknown_backend():
    result = _run_cli("--backend", "nonsense")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cli_triton_self_check():
    # Without a GPU the CLI must switch Triton to its interpreter itself, so the variable is not inherited.
    result = _run_cli("--backend", "triton", "--quick", env_drop=("TRITON_INTERPRET",))
    out = result.stdout
    if not torch.cuda.is_available():
        assert "set TRITON_INTERPRET=1" in out
    if "triton     not available" in out:
        pytest.skip(out.split("triton     not available: ")[1].splitlines()[0])
    assert result.returncode == 0, out + result.stderr
    assert "deterministic  prefix gradients repeat bit for bit: PASS" in out
    assert out.rstrip().endswith("result: PASS (triton)")


@pytest.mark.parametrize("name", ["native", "reference"])
def test_cli_full_self_check_of_fast_backends(name):
    # Every case, not only the quick ones (dropout-free bias gradients included): a case a backend declines by
    # design would be reported as skipped with the reason, never as a failure.
    if backends.unavailable_reason(name) is not None:
        pytest.skip(backends.unavailable_reason(name))
    result = _run_cli("--backend", name)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.rstrip().endswith(f"result: PASS ({name})")
    assert "FAIL" not in out
    if not torch.cuda.is_available():  # on a CPU both serve every case
        assert "skipped" not in out


# ----------------------------------------------------------------------------------------------------------------
# A backend that disagrees with the reference makes the self-check fail
# ----------------------------------------------------------------------------------------------------------------

Reference = backends.ReferenceBackend


def _wrong_forward(change):
    def forward(*args):
        return change(*Reference.forward(*args))

    return forward


def _wrong_backward(change):
    def backward(*args, **buffers):
        return change(list(Reference.backward(*args, **buffers)))

    return backward


def _without_lengths_forward(call):
    return Reference.forward(call._replace(prefix_lengths=None))


def _without_lengths_backward(go, gl, call, *rest, **buffers):
    return Reference.backward(go, gl, call._replace(prefix_lengths=None), *rest, **buffers)


def _halve_prefix_k_grad(grads):
    grads[3] = grads[3] * 0.5
    return tuple(grads)


def _nan_in_dq(grads):
    grads[0] = grads[0].clone()
    grads[0].view(-1)[3] = float("nan")
    return tuple(grads)


def _raise(*args):
    raise RuntimeError("kernel launch failed")


WRONG = {
    "output scaled by 1.05": dict(forward=_wrong_forward(lambda out, lse: (out * 1.05, lse))),
    "lse shifted by 0.05": dict(forward=_wrong_forward(lambda out, lse: (out, lse + 0.05))),
    "prefix_lengths ignored": dict(forward=_without_lengths_forward, backward=_without_lengths_backward),
    "prefix_k gradient halved": dict(backward=_wrong_backward(_halve_prefix_k_grad)),
    "a NaN in grad q": dict(backward=_wrong_backward(_nan_in_dq)),
    "output in the wrong dtype": dict(forward=_wrong_forward(lambda out, lse: (out.double(), lse))),
    "forward raises": dict(forward=_raise),
}


@pytest.mark.parametrize("bug", sorted(WRONG))
def test_wrong_backend_makes_the_check_fail(bug, monkeypatch, capsys):
    methods = {"forward": staticmethod(Reference.forward), "backward": staticmethod(Reference.backward)}
    methods.update({name: staticmethod(function) for name, function in WRONG[bug].items()})
    wrong = type("WrongBackend", (), methods)
    real_implementation = backends.implementation
    monkeypatch.setattr(backends, "implementation",
                        lambda name: wrong if name == "reference" else real_implementation(name))

    assert cli.main(["--backend", "reference", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert out.rstrip().endswith("result: FAIL: reference")


@pytest.mark.parametrize("marker", ["attn_bias", "float attn_mask"])
def test_a_backend_that_takes_no_bias_skips_the_bias_cases(monkeypatch, marker):
    """The CUDA kernels take no additive score bias by design (attn_bias, or a float attn_mask, which the op adds
    like one): the self-check says so for those cases instead of failing."""
    reason = "its kernels take no additive score bias (test)"
    monkeypatch.setattr(backends, "unsupported_reason",
                        lambda name, *args, attn_bias=None, **kwargs: reason if attn_bias is not None else None)
    case = next(case for case in cli.CASES if marker in case.name)
    outcome, lines = cli.Outcome(), []
    cli.check_case("reference", case, torch.float32, "cpu", 0, outcome, lines.append)
    assert outcome.checks == outcome.failures == 0
    assert lines[-1].strip() == f"skipped: {reason}"


def test_right_backend_passes_in_process(capsys):
    assert cli.main(["--backend", "reference", "--quick"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("result: PASS (reference)")


def test_max_error_treats_nan_and_mismatched_infinities_as_infinite():
    ref = torch.tensor([1.0, float("-inf"), 2.0])
    assert cli._max_error(torch.tensor([1.0, float("-inf"), 2.5]), ref) == 0.5
    assert cli._max_error(torch.tensor([1.0, 0.0, 2.0]), ref) == float("inf")
    assert cli._max_error(torch.tensor([1.0, float("-inf"), float("nan")]), ref) == float("inf")
    assert cli._max_error(torch.tensor([1.0, float("inf"), 2.0]), ref) == float("inf")
