"""``compile.enabled=true`` (capsnets/utils/compile.py): the compiled networks compute what the eager ones do, values
and gradients, as one graph per compiled module where the model has no graph break; train.py compiles with inductor,
and its checkpoints are an eager model's (eval.py reproduces the test accuracy)."""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
from hydra import compose, initialize_config_dir

from capsnets.config_checks import check_config
from capsnets.errors import ConfigError
from capsnets.utils.compile import compile_model, cpp_compiler
from capsnets.utils.instantiate import instantiate_model
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS, last_metric, synthetic_run


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train.yaml", overrides=["data=mnist_sample", *overrides])


def twins(*overrides: str):
    """An eager model and a copy of it (same weights) to compile, in float64."""
    cfg = composed(*overrides)
    torch.manual_seed(0)
    eager = instantiate_model(cfg.model).double()
    compiled = instantiate_model(cfg.model).double()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def step(model, x, y):
    """Loss, class scores and every parameter's gradient of one training step."""
    model.zero_grad()
    loss, scores, _ = model.shared_step((x, y), "train")
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), scores.detach(), grads


def assert_same_step(eager, compiled, x, y):
    loss_e, scores_e, grads_e = step(eager, x, y)
    loss_c, scores_c, grads_c = step(compiled, x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores_c, scores_e, rtol=1e-10, atol=1e-12)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=em_caps_small", "model/routing=vb"],  # fused VB routing and its batch norms
        ["model=dr_caps", *SMALL_DR_CAPS],  # fused dynamic routing, and the decoder compiled on its own
    ],
    ids=["em_caps_small-vb", "dr_caps"],
)
def test_compiled_training_step_equals_eager_as_one_graph_per_module(overrides):
    eager, compiled = twins(*overrides)
    names = compile_model(compiled, {"enabled": True, "backend": "aot_eager", "fullgraph": True})
    assert names == list(compiled.compiled_modules())
    x, y = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    assert_same_step(eager, compiled, x, y)
    # fullgraph: a graph break would have raised; one graph per compiled module
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(names)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep the eager names


def test_compiled_em_caps_small_trains_evaluates_and_records_routing_as_eager():
    """Fused EM routing with votes from their factors: the training step as one graph, then evaluation (batch-norm
    running statistics) and the recorded routing iterations (routing pictures)."""
    eager, compiled = twins("model=em_caps_small")
    compile_model(compiled, {"enabled": True, "backend": "aot_eager", "fullgraph": True})
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    assert_same_step(eager, compiled, x, torch.tensor([0, 1, 2]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled.scores(x), eager.scores(x), rtol=1e-10, atol=1e-12)
    view_e, view_c = eager.inspect(x), compiled.inspect(x)  # routing pictures: every iteration recorded
    assert view_c.traces.keys() == view_e.traces.keys() and view_e.traces
    for name, trace in view_e.traces.items():
        got = view_c.traces[name]
        assert len(got.assignments) == len(trace.assignments) > 0
        for a, b in zip(got.assignments + got.activations, trace.assignments + trace.activations, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_compiled_model_traces_the_routing_kernels_into_its_one_graph():
    """model.routing.kernels=compiled: outside torch.compile each kernel runs compiled on its own; inside a compiled
    model the kernels' formulas are traced into the model's graph (no nested compile, no graph break)."""
    eager, compiled = twins("model=em_caps_small", "model.routing.kernels=compiled")
    compile_model(compiled, {"enabled": True, "backend": "aot_eager", "fullgraph": True})
    x, y = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 2])
    loss_e, scores_e, grads_e = step(eager, x, y)  # compiles each kernel on its own (graphs of their own)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 1
    torch._dynamo.utils.counters.clear()
    loss_c, scores_c, grads_c = step(compiled, x, y)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the kernels traced into the model's graph
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores_c, scores_e, rtol=1e-10, atol=1e-12)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-9, atol=1e-12, msg=name)


def test_random_routing_compiles_around_its_fixed_draw():
    eager, compiled = twins("model=dr_caps", *SMALL_DR_CAPS, "model/routing=random")
    compile_model(compiled, {"enabled": True, "backend": "aot_eager"})
    x, y = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    assert_same_step(eager, compiled, x, y)
    assert_same_step(eager, compiled, x, y)  # the cached draw: the same assignments again
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) >= 1  # the draw runs eagerly


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compile.enabled=yes"], "compile.enabled must be true or false"),
        (["compile.enabled=true", "compile.mode=fast"], "compile.mode must be one of default"),
        (["compile.enabled=true", "compile.backend=inductr"], "compile.backend=inductr: not a TorchDynamo backend"),
        (["compile.enabled=true", "compile.backend=aot_eager", "compile.mode=max-autotune"], "inductor setting"),
        (["compile.enabled=true", "compile.fullgraph=true", "model/routing=random"], "compile.fullgraph=false"),
    ],
)
def test_bad_compile_settings_are_refused_before_anything_is_built(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(composed(*overrides))


def test_inductor_on_a_cpu_without_a_cpp_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert cpp_compiler() is None
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        check_config(composed("compile.enabled=true", "trainer=cpu"))
    check_config(composed("compile.enabled=true", "trainer=cpu", "compile.backend=aot_eager"))  # needs none


@pytest.mark.slow
def test_train_py_compiles_with_inductor_and_eval_py_reads_its_checkpoint(cli, tmp_path):
    assert cpp_compiler() is not None, "inductor needs a C++ compiler on a CPU: make install adds g++ (as root)"
    proc = cli("train.py", *synthetic_run(tmp_path, "run", "compile.enabled=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"torch\.compile \(\{'backend': 'inductor'.*\): net, net\.decoder", proc.stdout + proc.stderr)
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    assert not any("_orig_mod" in key for key in torch.load(best, map_location="cpu")["state_dict"])
    proc = cli("eval.py", f"ckpt_path={best}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"test/acc: ([0-9.]+)", proc.stdout)
    assert match and float(match.group(1)) == pytest.approx(last_metric(tmp_path / "run", "test/acc"), abs=1e-6)


@pytest.mark.slow
def test_train_py_with_compiled_routing_kernels_and_eval_py_with_eager_ones_agree(cli, tmp_path):
    """The default ``model.routing.kernels=auto`` as a user runs it (the suite's CAPSNETS_ROUTING_KERNELS unset):
    em_caps_small trains with compiled kernels, and eval.py with eager ones reproduces its test accuracy and loss."""
    assert cpp_compiler() is not None, "inductor needs a C++ compiler on a CPU: make install adds g++ (as root)"
    tiny_em = ["model=em_caps_small", "model.net.A=8", "model.net.B=4", "model.net.C=4", "model.net.D=4"]
    proc = cli("train.py", *synthetic_run(tmp_path, "run", model=tiny_em), env={"CAPSNETS_ROUTING_KERNELS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile failed" not in proc.stdout + proc.stderr
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    # eval.py rebuilds the model from the checkpoint (kernels=auto), here told to run auto as eager
    proc = cli(
        "eval.py",
        f"ckpt_path={best}",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        env={"CAPSNETS_ROUTING_KERNELS": "eager"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("test/acc", "test/loss"):
        match = re.search(rf"{name}: ([0-9.]+)", proc.stdout)
        # eval.py prints 4 decimals; one of the 64 test images is 0.0156 of accuracy
        assert match and float(match.group(1)) == pytest.approx(last_metric(tmp_path / "run", name), abs=1e-4), name
