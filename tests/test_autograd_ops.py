"""gradcheck of the analytic backward, opcheck of every operator, torch.compile."""

import pytest
import torch

import cbn_ext
from conftest import Fc, device_params, make_case, rel_err

ops = torch.ops.cbn_ext


def _fn(case, training, nbt, groups):
    def f(x, w, b):
        n = None if nbt is None else torch.tensor(nbt, device=x.device)
        return Fc.compound_batch_norm(x, case.running_mean.clone(), case.running_var.clone(),
                                      case.running_prior.clone(), w, b, training, 0.1, 1e-5, n,
                                      groups)
    return f


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
# Not the first batch: its initialisation depends on x but is a constant for the
# gradient (SPEC), so finite differences disagree by design; test_kernels compares that
# case with the reference's autograd instead.
@pytest.mark.parametrize("mode", ["train", "eval", "split-train", "split-eval"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_gradcheck(K, mode, layout, device):
    if mode.startswith("split") and K == 1:
        pytest.skip("K = 1 has a single group")
    case = make_case((3, 4, 3, 2), K, torch.float64, channels_last=(layout == "channels_last"),
                     seed=K, device=device, groups=mode.startswith("split"))
    training = "train" in mode
    nbt = 3
    inputs = (case.x.clone().requires_grad_(), case.weight.clone().requires_grad_(),
              case.bias.clone().requires_grad_())
    assert torch.autograd.gradcheck(_fn(case, training, nbt, case.groups), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", device_params())
def test_gradcheck_1d_and_3d(device):
    for shape in [(7, 5), (2, 3, 2, 2, 3)]:
        case = make_case(shape, 2, torch.float64, seed=1, device=device)
        inputs = (case.x.clone().requires_grad_(), case.weight.clone().requires_grad_(),
                  case.bias.clone().requires_grad_())
        assert torch.autograd.gradcheck(_fn(case, True, 3, None), inputs, eps=1e-6, atol=1e-7)


def _forward_train_args(case, nbt):
    n = torch.tensor(nbt, device=case.x.device)
    return (case.x, case.weight, case.bias, case.running_mean, case.running_var,
            case.running_prior, n, case.groups, case.K, 1e-5)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("K,groups", [(1, False), (2, False), (3, True)])
def test_opcheck(K, groups, layout, requires_grad, device):
    case = make_case((4, 6, 5, 3), K, torch.float32, channels_last=(layout == "channels_last"),
                     seed=2, device=device, groups=groups)
    x = case.x.clone().requires_grad_(requires_grad)
    w = case.weight.clone().requires_grad_(requires_grad)
    b = case.bias.clone().requires_grad_(requires_grad)
    case.x, case.weight, case.bias = x, w, b
    for nbt in (0, 3):
        torch.library.opcheck(ops.forward_train.default, _forward_train_args(case, nbt))
    torch.library.opcheck(ops.forward_eval.default,
                          (x, w, b, case.running_mean, case.running_var, case.running_prior,
                           case.groups, K, 1e-5))

    with torch.no_grad():
        out = ops.forward_train(*_forward_train_args(case, 3))
    _, tau, mean, var, count, mix_mean, mix_var, mix_prior = out
    g = case.grad
    soft = K > 1 and not groups
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(ops.backward_train.default,
                              (g, x.detach(), w.detach(), b.detach(), tau, mean, var, count,
                               mix_mean, mix_var, soft, 1e-5, mask))
    _, tau_e = ops.forward_eval(x.detach(), w.detach(), b.detach(), case.running_mean,
                                case.running_var, case.running_prior, case.groups, K, 1e-5)
    torch.library.opcheck(ops.backward_eval.default,
                          (g, x.detach(), w.detach(), b.detach(), tau_e, case.running_mean,
                           case.running_var, soft, 1e-5, [True, True, True]))
    for momentum in (0.1, None):
        torch.library.opcheck(ops.update_running_stats.default,
                              (case.running_mean.clone(), case.running_var.clone(),
                               case.running_prior.clone(), torch.tensor(3, device=device),
                               mix_mean, mix_var, mix_prior, mean, var, count, 60, momentum))


class SmallCNN(torch.nn.Module):
    def __init__(self, K):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = cbn_ext.CompoundBatchNorm2d(8, K)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = cbn_ext.CompoundBatchNorm2d(8, K)
        self.head = torch.nn.Linear(8, 5)
        self.bn3 = cbn_ext.CompoundBatchNorm1d(5, K)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.head(x.mean((2, 3))))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_fullgraph(channels_last, device):
    """torch.compile(fullgraph=True) traces through the operators (fake kernels, autograd)
    and matches eager mode in training (including the first-batch initialisation) and
    evaluation."""
    torch.manual_seed(0)
    K = 2
    eager = SmallCNN(K).to(device)
    compiled_model = SmallCNN(K).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
        compiled_model = compiled_model.to(memory_format=torch.channels_last)
    # the float64 truth for gradients that cancel: conv1's bias gradient sums dx of bn1,
    # which is close to zero by channel (a normalization removes each component's mean);
    # there eager and compiled float32 differ by 1.5e-4 on an H200 (2026-11-29), each
    # summing differently rounded terms
    exact = SmallCNN(K).to(device, torch.float64)
    exact.load_state_dict(eager.state_dict())
    if channels_last:
        exact = exact.to(memory_format=torch.channels_last)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(3):
        x = torch.randn(6, 3, 8, 8, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ye, yc, yx = eager(x), compiled(x), exact(x.double())
        assert rel_err(yc, ye) <= 1e-5, step
        ye.square().sum().backward()
        yc.square().sum().backward()
        yx.square().sum().backward()
        eager_grads = dict(eager.named_parameters())
        for (name, pe), (_, pc), (_, px) in zip(eager.named_parameters(),
                                                compiled_model.named_parameters(),
                                                exact.named_parameters()):
            # compiled as eager; or, where the float32 gradient is that far from float64
            # for eager too, compiled's error at most twice eager's (the SPEC's rule for
            # what PyTorch's own arithmetic cannot reach); or, for a convolution's bias
            # (ahead of a normalization, which removes its gradient's mean), the difference
            # small beside the gradient of the convolution's weight (the same upstream
            # gradient, summed without the cancellation)
            err_c, err_e = rel_err(pc.grad, px.grad), rel_err(pe.grad, px.grad)
            conv_bias = name.startswith("conv") and name.endswith(".bias")
            scale = (eager_grads[name[:-len("bias")] + "weight"].grad.norm().item()
                     if conv_bias else 0.0)
            assert (rel_err(pc.grad, pe.grad) <= 1e-4 or err_c <= 2 * err_e
                    or (pc.grad - pe.grad).norm().item() <= 1e-4 * scale), (
                step, name, rel_err(pc.grad, pe.grad), err_c, err_e, scale)
        for (name, be), (_, bc) in zip(eager.named_buffers(), compiled_model.named_buffers()):
            assert rel_err(bc, be) <= 1e-5, (step, name)
    assert compiled_model.bn1.num_batches_tracked.item() == 3
    eager.eval()
    compiled_model.eval()
    x = torch.randn(4, 3, 8, 8, device=device)
    with torch.no_grad():
        assert rel_err(compiled(x), eager(x)) <= 1e-5
