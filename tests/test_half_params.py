"""model.half() and model.to(torch.bfloat16): float16 / bfloat16 input with parameters and
buffers in the input's own dtype (SPEC "Shapes and state"), as nn.BatchNorm accepts.
Accumulation is in float32; the running buffers are updated in float32 and stored in
their own dtype, in place; other mixes raise."""

import copy

import pytest
import torch
from torch import nn

import cbn_ext
from conftest import (HAS_CUDA, TOL, Case, Fc, R, backend, device_params, make_stable_case,
                      rel_err, run, torch_device)
from test_training import TinyResNet, randomize_bn

HALF = [torch.float16, torch.bfloat16]


def _model(K, device):
    torch.manual_seed(0)
    model = TinyResNet(num_classes=4)
    randomize_bn(model)
    return cbn_ext.convert_batchnorm(model, num_components=K).to(device)


def _reference_forward(self, input):
    """A compound layer computed by the pure-PyTorch reference, in the layer's dtypes."""
    return R.compound_batch_norm(
        input, self.running_mean, self.running_var, self.running_prior, self.weight, self.bias,
        self.training, self.momentum, self.eps,
        self.num_batches_tracked if self.training else None, self._split_groups)


def _errors(model, ref, dtype, x):
    """Relative errors of `model` (cast to dtype) against `ref` (float32): eval output,
    training output, the parameter gradients, and each floating buffer after the step."""
    ref, model = ref.eval(), model.eval()
    with torch.no_grad():
        out = {"eval": rel_err(model(x.to(dtype)), ref(x))}
    ref.train()
    model.train()
    y_ref, y = ref(x), model(x.to(dtype))
    out["train"] = rel_err(y, y_ref)
    y_ref.square().sum().backward()
    y.float().square().sum().backward()
    # the gradients of all parameters together: single small gradients carry the noise of
    # ten half-precision layers, which one draw of it does not rank
    out["gradients"] = rel_err(torch.cat([p.grad.double().flatten() for p in model.parameters()]),
                               torch.cat([p.grad.double().flatten() for p in ref.parameters()]))
    for (name, br), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        if br.is_floating_point():
            out["buffer " + name] = rel_err(b, br)
    return out


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("K", [1, 2])
def test_cast_model_eval_and_training_step(K, dtype, device, monkeypatch):
    """A converted network cast with .half() / .to(bfloat16), against the same network in
    float32, in evaluation and over a training step (outputs, every parameter gradient,
    the running buffers): within the half-precision bound, or twice the error of the same
    cast network computed by the pure-PyTorch reference (SPEC's rule: ten half-precision
    convolutions and a mixture stored in half precision err by more than one layer does).
    The buffers keep their dtype and storage and are updated in place."""
    dev = torch_device(device)
    ref32 = _model(K, dev)
    x = torch.randn(8, 3, 16, 16, device=dev)
    with backend(device):
        ref32.train()
        ref32(torch.randn(16, 3, 16, 16, device=dev))  # the first batch: mixture initialised
        cast = copy.deepcopy(ref32).to(dtype)
        by_reference = copy.deepcopy(cast)
        layers = [m for m in cast.modules() if isinstance(m, cbn_ext.CompoundBatchNorm2d)]
        assert layers and all(m.weight.dtype == dtype and m.running_var.dtype == dtype
                              for m in layers)
        storages = [(m.running_mean.data_ptr(), m.running_var.data_ptr(),
                     m.running_prior.data_ptr()) for m in layers]
        before = [m.running_mean.clone() for m in layers]
        ours = _errors(cast, copy.deepcopy(ref32), dtype, x)
    for m, st, b in zip(layers, storages, before):
        assert (m.running_mean.data_ptr(), m.running_var.data_ptr(),
                m.running_prior.data_ptr()) == st, "updated in place"
        assert m.running_mean.dtype == dtype and not torch.equal(m.running_mean, b)
    assert all(p.grad.dtype == dtype for p in cast.parameters())
    monkeypatch.setattr(cbn_ext.modules._CompoundBatchNorm, "forward", _reference_forward)
    theirs = _errors(by_reference, copy.deepcopy(ref32), dtype, x)
    bad = {k: (e, theirs[k]) for k, e in ours.items() if not e <= max(TOL[dtype], 2 * theirs[k])}
    assert not bad, f"(ours, reference's) above the rule: {bad}"


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["train", "eval", "split-train"])
@pytest.mark.parametrize("K", [1, 3])
def test_functional_with_reduced_precision_parameters(K, mode, dtype, device):
    """The operators with every parameter and buffer in the input's dtype against the
    float64 reference on the same (rounded) values."""
    if mode.startswith("split") and K == 1:
        pytest.skip("K = 1 has a single group")
    training = mode != "eval"
    case = make_stable_case((6, 10, 5, 7), K, dtype, seed=K, device=device,
                            groups=mode.startswith("split"))
    half = Case(case.x, *(t.to(dtype) for t in (case.running_mean, case.running_var,
                                                  case.running_prior, case.weight, case.bias)),
                case.grad, case.groups, case.device)
    ours = run(Fc.compound_batch_norm, half, training)
    ref = run(R.compound_batch_norm, half, training, dtype=torch.float64)
    assert ours.dw.dtype == dtype and ours.running_mean.dtype == dtype
    for name in ("y", "dx", "dw", "db", "running_mean", "running_var", "running_prior"):
        assert rel_err(getattr(ours, name), getattr(ref, name)) <= TOL[dtype], name


def test_rejected_mixes():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(TypeError, match=r"of dtype float32 for float32 input, got bfloat16"):
        cbn_ext.CompoundBatchNorm2d(3, 2).to(torch.bfloat16)(x)  # as BatchNorm
    with pytest.raises(TypeError, match=r"of dtype float32 or float16 for float16 input, "
                                        r"got bfloat16"):
        cbn_ext.CompoundBatchNorm2d(3, 2).to(torch.bfloat16)(x.half())
    with pytest.raises(TypeError, match=r"of dtype float64 for float64 input, got float32"):
        cbn_ext.CompoundBatchNorm2d(3, 2)(x.double())
    with pytest.raises(TypeError, match=r"running statistics must have dtype float64"):
        torch.ops.cbn_ext.update_running_stats(
            torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16),
            None, None, torch.zeros(2, 3, dtype=torch.float64),
            torch.ones(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
            torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64),
            torch.full((2,), 5.0, dtype=torch.float64), 10, 0.1)


@pytest.mark.parametrize("dtype", HALF)
def test_batchnorm_casts_alike(dtype):
    """What nn.BatchNorm2d does with a cast model, the converted model does too."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval().to(dtype)
    conv = cbn_ext.convert_batchnorm(copy.deepcopy(model), 2)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    assert rel_err(conv(x), model(x)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", HALF)
def test_compile_fullgraph_with_cast_model(dtype):
    """torch.compile(fullgraph=True) of a cast model: the fake kernels give gradients in
    the parameters' dtype, as the kernels do."""
    eager = _model(2, "cpu").to(dtype)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(6, 3, 8, 8).to(dtype)
        ye, yc = eager(x), compiled(x)
        assert rel_err(yc, ye) <= 5 * TOL[dtype], step
        ye.float().square().sum().backward()
        yc.float().square().sum().backward()
    # inductor fuses the neighbouring operations in float32 where eager rounds each to the
    # dtype: compiled and eager differ by that rounding, carried through the backward
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        assert pc.grad.dtype == dtype and rel_err(pc.grad, pe.grad) <= 0.1, name
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 8, 8).to(dtype)
        assert rel_err(compiled(x), eager(x)) <= 5 * TOL[dtype]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a build with CUDA kernels")
@pytest.mark.parametrize("dtype", HALF)
def test_cast_model_on_cuda(dtype, monkeypatch):
    test_cast_model_eval_and_training_step(2, dtype, "cuda", monkeypatch)
