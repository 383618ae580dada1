"""Conversion of models, class groups, the split path, the dual-path loss, autocast."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cbn_ext
from cbn_ext import CompoundBatchNorm2d, SyncCompoundBatchNorm
from conftest import R, make_case, rel_err


# ---------------------------------------------------------------------------------------
# A torchvision-style ResNet (BasicBlock, downsample = conv + BatchNorm), without the
# torchvision dependency.
# ---------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.bn_fc = nn.BatchNorm1d(num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.bn_fc(self.fc(torch.flatten(self.avgpool(x), 1)))


def randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_convert_resnet_keeps_eval_output(K):
    torch.manual_seed(0)
    model = TinyResNet()
    randomize_bn(model)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    converted = cbn_ext.convert_batchnorm(model, num_components=K)
    kinds = {type(m) for m in converted.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert cbn_ext.CompoundBatchNorm2d in kinds and cbn_ext.CompoundBatchNorm1d in kinds
    assert isinstance(converted.layer2[0].downsample[1], CompoundBatchNorm2d)
    assert not converted.training and not converted.bn1.training
    with torch.no_grad():
        after = converted(x)
    assert rel_err(after, before) <= 1e-5


def test_convert_keeps_dtype_requires_grad_and_mode():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).double()
    model[1].weight.requires_grad_(False)
    model.train()
    converted = cbn_ext.convert_batchnorm(model, 2)
    bn = converted[1]
    assert isinstance(bn, cbn_ext.CompoundBatchNorm1d) and bn.training
    assert bn.weight.dtype == torch.float64 and bn.running_mean.dtype == torch.float64
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    assert converted(torch.randn(8, 4, dtype=torch.float64)).dtype == torch.float64


def test_convert_top_level_and_sync_batchnorm():
    assert isinstance(cbn_ext.convert_batchnorm(nn.BatchNorm3d(3), 2), cbn_ext.CompoundBatchNorm3d)
    sync = nn.SyncBatchNorm(5)
    converted = cbn_ext.convert_batchnorm(nn.Sequential(sync), 2)
    assert isinstance(converted[0], SyncCompoundBatchNorm)
    assert converted[0].num_components == 2


def test_convert_rejects_untracked_batchnorm_with_components():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="convert_batchnorm: 1:"):
        cbn_ext.convert_batchnorm(model, 2)
    assert isinstance(cbn_ext.convert_batchnorm(model, 1)[1], CompoundBatchNorm2d)


def test_convert_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=7)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        after = cbn_ext.convert_batchnorm(model, 2)(x)
    assert rel_err(after, before) <= 1e-5


def test_converted_state_dict_round_trip():
    model = cbn_ext.convert_batchnorm(TinyResNet(), 2)
    model(torch.randn(6, 3, 8, 8))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = cbn_ext.convert_batchnorm(TinyResNet(), 2)
    other.load_state_dict(torch.load(buf))
    model.eval()
    other.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


# ---------------------------------------------------------------------------------------
# class_groups
# ---------------------------------------------------------------------------------------

def test_class_groups_order_and_ties():
    # counts: class 1 first, then 2 and 3 (tie: lower index first), then 0, then 4
    groups = cbn_ext.class_groups([5, 100, 20, 20, 1], 2)
    assert groups.tolist() == [1, 0, 0, 0, 1]
    assert groups.dtype == torch.long
    assert cbn_ext.class_groups(torch.tensor([3, 3, 3, 3]), 4).tolist() == [0, 1, 2, 3]
    assert cbn_ext.class_groups([10, 1, 5], 1).tolist() == [0, 0, 0]


def test_class_groups_errors():
    with pytest.raises(ValueError, match="num_groups"):
        cbn_ext.class_groups([1, 2], 3)
    with pytest.raises(ValueError, match="num_groups"):
        cbn_ext.class_groups([1, 2], 0)
    with pytest.raises(ValueError, match="1-D"):
        cbn_ext.class_groups([[1, 2]], 1)


# ---------------------------------------------------------------------------------------
# split_by
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_by_matches_reference_given_responsibilities(training, channels_last):
    K, C = 3, 6
    case = make_case((8, C, 5, 4), K, torch.float32, channels_last=channels_last, seed=4,
                     groups=True)
    layer = CompoundBatchNorm2d(C, K)
    with torch.no_grad():
        layer.weight.copy_(case.weight)
        layer.bias.copy_(case.bias)
        layer.running_mean.copy_(case.running_mean)
        layer.running_var.copy_(case.running_var)
        layer.running_prior.copy_(case.running_prior)
        layer.num_batches_tracked.fill_(3)
    layer.train(training)
    ref_bufs = [t.double().clone() for t in (case.running_mean, case.running_var, case.running_prior)]
    x = case.x.clone().requires_grad_()
    with cbn_ext.split_by(layer, case.groups):
        y = layer(x)
    assert layer._split_groups is None, "split_by restores the layers on exit"
    ref = R.compound_batch_norm(x.detach().double(), *ref_bufs, case.weight.double(),
                                case.bias.double(), training, 0.1, 1e-5, torch.tensor(3),
                                case.groups)
    assert rel_err(y, ref) <= 1e-5
    if training:
        assert rel_err(layer.running_mean, ref_bufs[0]) <= 1e-5
        assert rel_err(layer.running_prior, ref_bufs[2]) <= 1e-5


def test_split_by_errors_name_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CompoundBatchNorm2d(4, 2), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), CompoundBatchNorm2d(4, 3))
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"^1: split_by group ids must be in \[0, 2\)"):
        with cbn_ext.split_by(model, torch.tensor([0, 2, 1, 0])):
            pass
    with pytest.raises(ValueError, match=r"^1: split_by gave 3 group ids for a batch of 4"):
        with cbn_ext.split_by(model, torch.tensor([0, 1, 1])):
            model(x)
    with pytest.raises(ValueError, match="integer"):
        with cbn_ext.split_by(model, torch.tensor([0.0, 1.0, 1.0, 0.0])):
            pass
    assert all(m._split_groups is None for m in model.modules()
               if isinstance(m, cbn_ext.CompoundBatchNorm2d))
    with cbn_ext.split_by(model, torch.tensor([0, 1, 1, 0])):
        assert model(x).shape == (4, 4, 5, 5)


def test_split_path_never_initialises():
    layer = CompoundBatchNorm2d(4, 2, momentum=1.0)
    x = torch.randn(6, 4, 3, 3)
    with cbn_ext.split_by(layer, torch.tensor([0, 0, 0, 1, 1, 1])):
        layer(x)
    # momentum 1: the running means are the groups' batch means, not an initialisation
    assert torch.allclose(layer.running_mean[0], x[:3].mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(layer.running_mean[1], x[3:].mean((0, 2, 3)), atol=1e-6)


# ---------------------------------------------------------------------------------------
# dual path
# ---------------------------------------------------------------------------------------

def test_dual_path_loss_parts_and_gradients():
    torch.manual_seed(1)
    model = cbn_ext.convert_batchnorm(TinyResNet(num_classes=5), 2)
    model.train()
    x = torch.randn(10, 3, 8, 8)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 4, 0])
    class_to_group = cbn_ext.class_groups(torch.bincount(y, minlength=5), 2)
    out = cbn_ext.dual_path_loss(model, x, y, class_to_group, consistency_weight=0.5)
    assert isinstance(out, cbn_ext.DualPathLoss)
    assert torch.allclose(out.loss, out.main + out.auxiliary + 0.5 * out.consistency)
    assert out.logits.shape == (10, 5)
    assert torch.allclose(out.main, F.cross_entropy(out.logits, y))
    assert out.consistency >= 0
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert model.bn1.num_batches_tracked.item() == 2  # both paths ran in training mode


def test_dual_path_matches_its_definition():
    """loss = CE(main) + CE(aux) + w KL(softmax(aux).detach() || softmax(main)), with the
    aux path under split_by(class_to_group[targets]); checked on a copy of the model."""
    import copy
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), cbn_ext.CompoundBatchNorm1d(8, 2), nn.ReLU(),
                          nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    class_to_group = torch.tensor([0, 1, 1])
    out = cbn_ext.dual_path_loss(model, x, y, class_to_group, consistency_weight=2.0)
    main = twin(x)
    with cbn_ext.split_by(twin, class_to_group[y]):
        aux = twin(x)
    p_aux = F.softmax(aux, 1)
    kl = (p_aux * (torch.log(p_aux) - F.log_softmax(main, 1))).sum(1).mean()
    assert torch.allclose(out.logits, main)
    assert torch.allclose(out.auxiliary, F.cross_entropy(aux, y))
    assert torch.allclose(out.consistency, kl, atol=1e-6)
    assert torch.allclose(out.loss, F.cross_entropy(main, y) + F.cross_entropy(aux, y) + 2 * kl,
                          atol=1e-6)
    # the consistency term's gradient reaches the main logits only (aux is detached)
    g_main = torch.autograd.grad(out.consistency, out.logits)[0]
    assert g_main.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------

def test_autocast_bfloat16_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CompoundBatchNorm2d(8, 2), nn.ReLU())
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    bn = model[1]
    assert bn.running_mean.dtype == torch.float32 and bn.weight.dtype == torch.float32
    assert bn.num_batches_tracked.item() == 1
    y.float().sum().backward()
    assert bn.weight.grad.dtype == torch.float32 and torch.isfinite(bn.weight.grad).all()
