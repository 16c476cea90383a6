"""Short fine-tuning: it learns, is seeded, and checks its arguments."""

from __future__ import annotations

import pytest
import torch
from nets import bright_pixels

from recon.finetune import _augment, _distill_loss, finetune
from recon.models import digits_vgg


def _problem(n: int = 256):
    return bright_pixels(n)


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.eval()(x), y))


def test_finetune_lowers_the_loss_and_returns_eval_mode():
    x, y = _problem()
    torch.manual_seed(0)
    net = digits_vgg(width=0.25)
    before = _loss(net, x, y)
    out = finetune(net, x, y, steps=60, lr=0.05, batch_size=32, augment=False, progress=False)
    assert out is net and not net.training
    assert _loss(net, x, y) < 0.5 * before


def test_finetune_is_seeded():
    x, y = _problem(64)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = digits_vgg(width=0.25)
        finetune(net, x, y, steps=5, batch_size=16, seed=3, progress=False)
        nets.append(net)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_augment_shifts_and_flips_without_changing_shape():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float).view(2, 3, 5, 5)
    out = _augment(x, torch.Generator().manual_seed(0), shift=2)
    assert out.shape == x.shape
    # every output pixel is either zero fill or a pixel of the same image and channel
    for i in range(2):
        for c in range(3):
            values = set(out[i, c].flatten().tolist()) - {0.0}
            assert values <= set(x[i, c].flatten().tolist())
    same = _augment(x, torch.Generator().manual_seed(0), shift=0)
    assert all(torch.equal(s, x[i]) or torch.equal(s, x[i].flip(2)) for i, s in enumerate(same))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "'steps'"),
        ({"steps": 2, "batch_size": 0}, "'batch_size'"),
        ({"steps": 2, "lr": 0}, "'lr'"),
        ({"steps": 2, "lr": True}, "'lr'"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, y = _problem(8)
    with pytest.raises(ValueError, match=match):
        finetune(digits_vgg(width=0.25), x, y, progress=False, **kwargs)


def test_bad_data():
    x, y = _problem(8)
    net = digits_vgg(width=0.25)
    with pytest.raises(ValueError, match="'x'"):
        finetune(net, x[:, 0], y, steps=1, progress=False)
    with pytest.raises(ValueError, match="'y'"):
        finetune(net, x, y.float(), steps=1, progress=False)
    with pytest.raises(ValueError, match="'y'"):
        finetune(net, x, y[:4], steps=1, progress=False)


def _kl_to(model, teacher, x) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher.eval()(x), 1)
        q = torch.log_softmax(model.eval()(x), 1)
    return float((p.exp() * (p - q)).sum(1).mean())


def test_distill_loss_is_the_tempered_kl():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    p, q = torch.softmax(t / 3, 1), torch.softmax(s / 3, 1)
    want = 9 * (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(_distill_loss(s, t, 3.0), want, rtol=1e-5)
    assert float(_distill_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_pulls_the_model_toward_its_teacher_not_the_labels():
    x, y = _problem()
    torch.manual_seed(0)
    teacher = digits_vgg(width=0.25)
    finetune(teacher, x, y, steps=40, lr=0.05, batch_size=32, augment=False, progress=False)
    torch.manual_seed(1)
    student = digits_vgg(width=0.25)
    wrong = (y + 1) % 10  # labels the distillation must ignore (distill=1)
    before = _kl_to(student, teacher, x)
    teacher.train()  # flags the call must give back
    finetune(student, x, wrong, steps=40, lr=0.05, batch_size=32, augment=False,
             teacher=teacher, distill=1.0, temperature=2.0, progress=False)  # fmt: skip
    assert all(m.training for m in teacher.modules())
    assert _kl_to(student, teacher, x) < 0.2 * before
    assert _loss(student, x, y) < _loss(student, x, wrong)


def test_distill_zero_is_plain_training():
    x, y = _problem(64)
    teacher = digits_vgg(width=0.25)
    nets = []
    for kwargs in ({}, {"teacher": teacher, "distill": 0.0}):
        torch.manual_seed(0)
        net = digits_vgg(width=0.25)
        finetune(net, x, y, steps=4, batch_size=16, seed=3, progress=False, **kwargs)
        nets.append(net)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"teacher": "net"}, TypeError, "'teacher'"),
        ({"distill": 1.5}, ValueError, "'distill'"),
        ({"distill": -0.1}, ValueError, "'distill'"),
        ({"temperature": 0.0}, ValueError, "'temperature'"),
        ({"temperature": float("nan")}, ValueError, "'temperature'"),
        (
            {"teacher": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))},
            ValueError,
            "'teacher'.*shape",
        ),
    ],
)
def test_bad_distillation_arguments(kwargs, error, match):
    x, y = _problem(8)
    with pytest.raises(error, match=match):
        finetune(digits_vgg(width=0.25), x, y, steps=1, progress=False, **kwargs)


class _Interrupt(RuntimeError):
    pass


class _FailOnCall(torch.nn.Module):
    """Identity that raises on its ``fail_at``-th call (a crash in the middle of training)."""

    def __init__(self, fail_at: int | None):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Interrupt
        return x


def _dropout_net(fail_at: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights for every call
    fail = _FailOnCall(fail_at)
    net = torch.nn.Sequential(
        fail,
        digits_vgg(width=0.25).features,
        torch.nn.Flatten(),
        torch.nn.Dropout(0.5),  # draws from torch's global generator
        torch.nn.LazyLinear(10),
    )
    net(torch.zeros(1, 1, 8, 8))  # materialise the lazy layer
    fail.calls = 0
    return net


def _train(net, x, y, **kw):
    return finetune(net, x, y, steps=7, lr=0.05, batch_size=24, progress=False, **kw)


def test_an_interrupted_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    x, y = _problem(64)  # 24-image batches: a new epoch inside the run
    path = tmp_path / "run.pt"
    whole = _train(_dropout_net(), x, y)
    with pytest.raises(_Interrupt):  # dies in step 6
        _train(_dropout_net(fail_at=6), x, y, checkpoint=path, checkpoint_every=2)
    assert torch.load(path, weights_only=True)["step"] == 4
    torch.manual_seed(123)  # the resumed run restores the global generator itself
    resumed = _train(_dropout_net(), x, y, checkpoint=path, checkpoint_every=2)
    assert not resumed.training
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.load(path, weights_only=True)["step"] == 7  # saved after the last step
    # complete: a further call trains no more and returns the same model
    again = _train(_dropout_net(), x, y, checkpoint=path)
    for a, b in zip(whole.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_without_a_checkpoint_file_training_starts_from_the_model(tmp_path):
    x, y = _problem(64)
    plain = _train(_dropout_net(), x, y)
    saved = _train(_dropout_net(), x, y, checkpoint=tmp_path / "sub" / "run.pt")
    for a, b in zip(plain.state_dict().values(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["run.pt"]  # no temporary left


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lr": 0.1}, "its lr is 0.05, this run's is 0.1"),
        ({"seed": 1}, "its seed is 0"),
        ({"teacher": digits_vgg(width=0.25)}, "its distill is None"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, match):
    x, y = _problem(64)
    path = tmp_path / "run.pt"
    _train(_dropout_net(), x, y, checkpoint=path)
    before = path.read_bytes()
    kw = {"lr": 0.05, "checkpoint": path} | change
    with pytest.raises(ValueError, match=match):
        finetune(_dropout_net(), x, y, steps=7, batch_size=24, progress=False, **kw)
    assert path.read_bytes() == before  # the file is left as it was


def test_a_checkpoint_of_another_architecture_or_not_a_state_is_refused(tmp_path):
    x, y = _problem(64)
    path = tmp_path / "run.pt"
    _train(_dropout_net(), x, y, checkpoint=path)
    other = digits_vgg(width=0.5)
    with pytest.raises(ValueError, match="other parameters or shapes"):
        finetune(other, x, y, steps=7, lr=0.05, batch_size=24, progress=False, checkpoint=path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a recon training state"):
        _train(_dropout_net(), x, y, checkpoint=junk)
    torch.save({"weights": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="is not a recon training state"):
        _train(_dropout_net(), x, y, checkpoint=junk)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"checkpoint": 3}, TypeError, "'checkpoint' argument must be a path"),
        ({"checkpoint": "."}, ValueError, "'checkpoint' argument must be a file path"),
        ({"checkpoint_every": 0}, ValueError, "'checkpoint_every'"),
    ],
)
def test_bad_checkpoint_arguments(kwargs, error, match):
    x, y = _problem(32)
    with pytest.raises(error, match=match):
        finetune(digits_vgg(width=0.25), x, y, steps=2, progress=False, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_resumes_with_the_same_masks(tmp_path):
    """On a GPU the dropout masks come from the CUDA generator, which the state holds.

    cuDNN's convolution gradients are not bit-reproducible from run to run (seen on an
    H200: two equal runs differ in the last bits), so the weights are compared to 1e-5;
    a resumed run that drew other masks would differ by orders of magnitude more."""
    x, y = _problem(64)
    path = tmp_path / "run.pt"
    whole = _train(_dropout_net().cuda(), x, y)
    with pytest.raises(_Interrupt):
        _train(_dropout_net(fail_at=6).cuda(), x, y, checkpoint=path, checkpoint_every=2)
    torch.cuda.manual_seed(123)
    resumed = _train(_dropout_net().cuda(), x, y, checkpoint=path, checkpoint_every=2)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
