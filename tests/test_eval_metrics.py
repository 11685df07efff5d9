"""fgcli.evaluate.metrics against hand computations and a plain numpy re-implementation,
on tiny models whose ideal saliency ordering is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fgcli.evaluate.metrics import (
    IMAGENET,
    Normalisation,
    curve_fractions,
    deletion_auc,
    gaussian_blur,
    insertion_auc,
    pixel_perturbation,
    step_counts,
)

NORM = Normalisation(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
KS = (10, 30, 50, 70, 90)


class PixelLinear(nn.Module):
    """logit_c = b_c + Σ_{ch,h,w} W[c,ch,h,w] · image[ch,h,w], image = the de-normalised
    input: every pixel's contribution to every logit is known exactly."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, norm: Normalisation) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight))
        self.bias = nn.Parameter(torch.from_numpy(bias))
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.norm.to_image(x)
        return torch.einsum("nchw,kchw->nk", image, self.weight) + self.bias


def linear_case(n: int = 3, size: int = 4, classes: int = 2, seed: int = 0):
    """Images in (0.05, 1), positive distinct weights for class 0, class 1 a constant below
    class 0's clean logit (so the clean top-1 is class 0 and softmax is not saturated)."""
    rs = np.random.RandomState(seed)
    image = rs.uniform(0.05, 1.0, (n, 3, size, size))
    weight = np.zeros((classes, 3, size, size))
    weight[0] = rs.uniform(0.1, 1.0, (3, size, size))
    for c in range(2, classes):
        weight[c] = rs.uniform(-0.5, 0.5, (3, size, size))
    bias = np.zeros(classes)
    bias[0] = 0.3
    clean0 = np.einsum("nchw,chw->n", image, weight[0]) + bias[0]
    bias[1] = float(clean0.min()) * 0.6
    model = PixelLinear(weight, bias, NORM).double()
    x = NORM.to_model(torch.from_numpy(image))
    return model, x, image, weight, bias


# ------------------------------------------------------------------ numpy reference


def np_logits(image: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.einsum("nchw,kchw->nk", image, weight) + bias


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_order(sal: np.ndarray, most_first: bool) -> np.ndarray:
    flat = sal.reshape(-1)
    return np.argsort(-flat if most_first else flat, kind="stable")


def np_round_count(frac_times_n: float) -> int:
    return math.floor(frac_times_n + 0.5)


def np_blur(image: np.ndarray, kernel: int = 11, sigma: float = 5.0) -> np.ndarray:
    r = kernel // 2
    g = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    g /= g.sum()
    h, w = image.shape[-2:]
    out = np.zeros_like(image)
    for i in range(h):
        for j in range(w):
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    ii, jj = min(max(i + a, 0), h - 1), min(max(j + b, 0), w - 1)
                    out[..., i, j] += g[a + r] * g[b + r] * image[..., ii, jj]
    return out


def np_pixel_perturbation(image, weight, bias, sal, ks, target):
    n, _, h, w = image.shape
    clean = np_logits(image, weight, bias)
    out = np.zeros((n, len(ks)))
    for i in range(n):
        order = np_order(sal[i], most_first=False)
        f = clean[i, target[i]]
        for j, k in enumerate(ks):
            img = image[i].reshape(3, -1).copy()
            img[:, order[:np_round_count(k / 100 * h * w)]] = 0.0
            f2 = np_logits(img.reshape(1, 3, h, w), weight, bias)[0, target[i]]
            out[i, j] = abs(f2 - f) / abs(f)
    return out


def np_curve(image, weight, bias, sal, steps, target, insertion):
    n, _, h, w = image.shape
    start = np_blur(image) if insertion else image
    curves = np.zeros((n, steps + 1))
    for i in range(n):
        order = np_order(sal[i], most_first=True)
        for t in range(steps + 1):
            img = start[i].reshape(3, -1).copy()
            idx = order[:np_round_count(t / steps * h * w)]
            img[:, idx] = image[i].reshape(3, -1)[:, idx] if insertion else 0.0
            curves[i, t] = np_softmax(np_logits(img.reshape(1, 3, h, w), weight, bias))[
                0, target[i]]
    frac = np.array([np_round_count(t / steps * h * w) for t in range(steps + 1)]) / (h * w)
    auc = ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(frac)).sum(axis=1)
    return auc, curves


# ------------------------------------------------------------------ normalisation


def test_normalisation_round_trip_and_black():
    image = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    x = NORM.to_model(image)
    torch.testing.assert_close(NORM.to_image(x), image, rtol=0, atol=1e-15)
    black = NORM.black(x)
    assert black.shape == (1, 3, 1, 1)
    torch.testing.assert_close(black.view(3), torch.tensor([-2.0, -2.0, -2.0],
                                                           dtype=torch.float64))
    torch.testing.assert_close(NORM.to_image(black).view(3), torch.zeros(3, dtype=torch.float64))
    assert IMAGENET.mean == (0.485, 0.456, 0.406)
    assert Normalisation([0, 0, 0], [1, 1, 1]).std == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("mean,std,msg", [
    ((0, 0), (1, 1, 1), "mean must be 3"),
    ((0, 0, 0), (1, 0, 1), "std must be positive"),
    ((0, 0, 0), (1, float("nan"), 1), "std must be 3 finite"),
    ("abc", (1, 1, 1), "mean must be 3"),
])
def test_normalisation_rejects_bad_stats(mean, std, msg):
    with pytest.raises(ValueError, match=msg):
        Normalisation(mean, std)


# ------------------------------------------------------------------ exact values


def test_counts_and_fractions():
    assert [math.floor(k * 16 / 100 + 0.5) for k in KS] == [2, 5, 8, 11, 14]
    assert step_counts(16, 4) == [0, 4, 8, 12, 16]
    assert step_counts(16, 3) == [0, 5, 11, 16]  # 5.33 -> 5, 10.67 -> 11
    assert step_counts(16, 1) == [0, 16]
    assert step_counts(2, 4) == [0, 1, 1, 2, 2]  # halves round up
    torch.testing.assert_close(curve_fractions(3, 4, 4),
                               torch.tensor([0, 5 / 16, 11 / 16, 1], dtype=torch.float64))


def test_blur_matches_numpy_and_commutes_with_normalisation():
    image = torch.rand(2, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(gaussian_blur(image).numpy(), np_blur(image.numpy()),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(NORM.to_model(gaussian_blur(image)),
                               gaussian_blur(NORM.to_model(image)), rtol=1e-12, atol=1e-12)
    flat = torch.full((1, 3, 5, 5), 0.7, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(flat), flat)  # replicated edges: no darkening


@pytest.mark.parametrize("saliency_kind", ["random", "ties"])
def test_exact_against_numpy_on_4x4(saliency_kind):
    model, x, image, weight, bias = linear_case(n=3, size=4, classes=3)
    rs = np.random.RandomState(5)
    if saliency_kind == "random":
        sal = rs.standard_normal((3, 4, 4))
    else:  # few distinct values: ties everywhere
        sal = rs.randint(0, 3, (3, 4, 4)).astype(np.float64)
    target = np_logits(image, weight, bias).argmax(axis=1)
    s = torch.from_numpy(sal)

    pp = pixel_perturbation(model, x, s, KS, norm=NORM)
    np.testing.assert_allclose(pp.numpy(), np_pixel_perturbation(image, weight, bias, sal, KS,
                                                                 target), rtol=1e-10, atol=1e-13)
    for steps in (1, 3, 4, 16, 20):
        for insertion, fn in ((False, deletion_auc), (True, insertion_auc)):
            auc, curves = fn(model, x, s, norm=NORM, steps=steps, return_curves=True)
            ref_auc, ref_curves = np_curve(image, weight, bias, sal, steps, target, insertion)
            assert curves.shape == (3, steps + 1) and auc.shape == (3,)
            np.testing.assert_allclose(curves.numpy(), ref_curves, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(auc.numpy(), ref_auc, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(fn(model, x, s, norm=NORM, steps=steps), auc,
                                       rtol=0, atol=0)


def test_curve_endpoints_and_trapezoid():
    model, x, image, weight, bias = linear_case(n=2, size=4)
    sal = torch.rand(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    clean = np_softmax(np_logits(image, weight, bias))[:, 0]
    black = np_softmax(np_logits(np.zeros_like(image), weight, bias))[:, 0]
    blurred = np_softmax(np_logits(np_blur(image), weight, bias))[:, 0]
    auc, curves = deletion_auc(model, x, sal, norm=NORM, steps=8, return_curves=True)
    np.testing.assert_allclose(curves[:, 0].numpy(), clean, rtol=1e-12)
    np.testing.assert_allclose(curves[:, -1].numpy(), black, rtol=1e-12)
    c = curves.numpy()
    np.testing.assert_allclose(auc.numpy(), (c.sum(1) - (c[:, 0] + c[:, -1]) / 2) / 8,
                               rtol=1e-12)  # 16 px / 8 steps: uniform spacing
    auc, curves = insertion_auc(model, x, sal, norm=NORM, steps=1, return_curves=True)
    np.testing.assert_allclose(curves[:, 0].numpy(), blurred, rtol=1e-12)
    np.testing.assert_allclose(curves[:, 1].numpy(), clean, rtol=1e-12)
    np.testing.assert_allclose(auc.numpy(), (blurred + clean) / 2, rtol=1e-12)


# ------------------------------------------------------------------ ordering by construction


def test_true_contribution_is_best_on_every_metric():
    model, x, image, weight, _ = linear_case(n=3, size=8, seed=2)
    # removing pixel p lowers logit 0 by exactly contrib[p] > 0 (distinct values)
    contrib = torch.from_numpy(np.einsum("nchw,chw->nhw", image, weight[0]))
    # inserting pixel p into the blurred copy raises logit 0 by exactly gain[p]
    gain = torch.from_numpy(np.einsum("nchw,chw->nhw", image - np_blur(image), weight[0]))
    g = torch.Generator().manual_seed(0)
    randoms = [torch.rand(3, 8, 8, dtype=torch.float64, generator=g) for _ in range(5)]

    def pp(s):
        return pixel_perturbation(model, x, s, KS, norm=NORM)

    def dele(s):
        return deletion_auc(model, x, s, norm=NORM, steps=16, return_curves=True)

    def ins(s):
        return insertion_auc(model, x, s, norm=NORM, steps=16, return_curves=True)

    best_pp, (best_del, del_curve), (best_ins, ins_curve) = pp(contrib), dele(contrib), ins(gain)
    tol = 1e-12
    assert (best_pp < pp(-contrib)).all()
    assert (best_del < dele(-contrib)[0]).all()
    assert (best_ins > ins(-gain)[0]).all()
    for r in randoms:
        assert (best_pp <= pp(r) + tol).all()  # every image, every k
        auc, curve = dele(r)
        assert (del_curve <= curve + tol).all() and (best_del < auc).all()
        auc, curve = ins(r)
        assert (ins_curve >= curve - tol).all() and (best_ins > auc).all()
    assert (best_pp.diff(dim=1) > 0).all()  # removing more always changes more here


# ------------------------------------------------------------------ k, ties, target


def test_k_endpoints():
    model, x, image, weight, bias = linear_case(n=2, size=4)
    sal = torch.rand(2, 4, 4, dtype=torch.float64)
    out = pixel_perturbation(model, x, sal, (0.01, 99.99), norm=NORM)
    f = np_logits(image, weight, bias)[:, 0]
    np.testing.assert_array_equal(out[:, 0].numpy(), 0.0)  # 0.0016 px -> none removed
    np.testing.assert_allclose(out[:, 1].numpy(), np.abs(bias[0] - f) / np.abs(f), rtol=1e-12)
    one = pixel_perturbation(model, x, sal, (50,), norm=NORM)
    assert one.shape == (2, 1)


def test_ties_broken_by_lower_index_first():
    model, x, image, weight, bias = linear_case(n=1, size=4)
    flat = torch.zeros(1, 4, 4, dtype=torch.float64)
    f = np_logits(image, weight, bias)[0, 0]
    row0 = (image[0, :, 0, :] * weight[0, :, 0, :]).sum()
    # constant map: k = 25 % removes the first row, for least- and most-salient orders alike
    pp = pixel_perturbation(model, x, flat, (25,), norm=NORM)
    np.testing.assert_allclose(pp.numpy(), [[row0 / abs(f)]], rtol=1e-12)
    _, curves = deletion_auc(model, x, flat, norm=NORM, steps=4, return_curves=True)
    z = np_logits(image, weight, bias)[0]
    z_row0 = z[0] - row0
    np.testing.assert_allclose(curves[0, 1].item(), np_softmax(np.array([[z_row0, z[1]]]))[0, 0],
                               rtol=1e-12)
    # partial ties: values 1 at (0,0) and (3,3), else 2 -> least-salient order starts 0, 15, 1
    sal = torch.full((1, 4, 4), 2.0, dtype=torch.float64)
    sal[0, 0, 0] = sal[0, 3, 3] = 1.0
    contrib = (image[0] * weight[0]).sum(0).reshape(-1)
    pp = pixel_perturbation(model, x, sal, (18.75,), norm=NORM)  # 3 pixels
    np.testing.assert_allclose(pp.numpy(), [[contrib[[0, 15, 1]].sum() / abs(f)]], rtol=1e-12)


def test_target_given_versus_top1():
    model, x, image, weight, bias = linear_case(n=3, size=4, classes=3)
    sal = torch.rand(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    z = np_logits(image, weight, bias)
    top1 = z.argmax(1)
    assert (top1 == 0).all()
    for fn, kw in ((pixel_perturbation, {"ks": KS}), (deletion_auc, {"steps": 5}),
                   (insertion_auc, {"steps": 5})):
        default = fn(model, x, sal, norm=NORM, **kw)
        for t in (top1.tolist(), torch.from_numpy(top1), 0, np.int64(0)):
            torch.testing.assert_close(fn(model, x, sal, norm=NORM, target=t, **kw), default,
                                       rtol=0, atol=0)
    target = [2, 1, 2]
    got = pixel_perturbation(model, x, sal, KS, norm=NORM, target=target)
    np.testing.assert_allclose(got.numpy(), np_pixel_perturbation(image, weight, bias,
                                                                  sal.numpy(), KS, target),
                               rtol=1e-10)
    got = deletion_auc(model, x, sal, norm=NORM, steps=4, target=torch.tensor(target))
    np.testing.assert_allclose(got.numpy(), np_curve(image, weight, bias, sal.numpy(), 4, target,
                                                     insertion=False)[0], rtol=1e-10)
    with pytest.raises(ValueError, match=r"target class out of range \[0, 3\)"):
        pixel_perturbation(model, x, sal, KS, norm=NORM, target=3)
    with pytest.raises(ValueError, match="one class index per image"):
        deletion_auc(model, x, sal, norm=NORM, target=[0, 1])
    with pytest.raises(ValueError, match="integer class indices"):
        insertion_auc(model, x, sal, norm=NORM, target=torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="integer class indices"):
        pixel_perturbation(model, x, sal, KS, norm=NORM, target=True)


def test_saliency_with_channel_axis_is_accepted():
    model, x, *_ = linear_case(n=2, size=4)
    sal = torch.rand(2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(pixel_perturbation(model, x, sal.unsqueeze(1), norm=NORM),
                               pixel_perturbation(model, x, sal, norm=NORM), rtol=0, atol=0)
    torch.testing.assert_close(deletion_auc(model, x, sal.float().unsqueeze(1), norm=NORM),
                               deletion_auc(model, x, sal.float(), norm=NORM), rtol=0, atol=0)


# ------------------------------------------------------------------ batching, mode, determinism


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                      nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(6, 5)
        with torch.no_grad():
            self.features[1].running_mean.uniform_(-0.2, 0.2)
            self.features[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def all_metrics(model, x, sal, max_batch):
    return (pixel_perturbation(model, x, sal, KS, norm=IMAGENET, max_batch=max_batch),
            *deletion_auc(model, x, sal, norm=IMAGENET, steps=6, max_batch=max_batch,
                          return_curves=True),
            *insertion_auc(model, x, sal, norm=IMAGENET, steps=6, max_batch=max_batch,
                           return_curves=True))


class PerImage(nn.Module):
    """Runs its inner model one image at a time and records every input: batch-invariant,
    so any difference between chunk sizes would come from the metric code."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.cat([self.inner(x[i:i + 1]) for i in range(x.shape[0])])


def test_chunking_is_identical_to_one_batch_and_deterministic():
    model = PerImage(TinyConv()).eval()
    g = torch.Generator().manual_seed(7)
    x = IMAGENET.to_model(torch.rand(5, 3, 9, 7, generator=g))
    sal = torch.rand(5, 9, 7, generator=g)
    one = all_metrics(model, x, sal, max_batch=1000)
    fed = torch.cat(model.seen)
    assert one[0].shape == (5, 5) and one[1].shape == (5,) and one[2].shape == (5, 7)
    for max_batch in (1, 4, 7, 35, 1000):  # 1000 again: deterministic
        model.seen.clear()
        for a, b in zip(one, all_metrics(model, x, sal, max_batch)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(torch.cat(model.seen), fed)  # same perturbed images, same order
    # a batched float32 model differs only by its own batch-size-dependent rounding
    for a, b in zip(all_metrics(model.inner, x, sal, 1000), all_metrics(model.inner, x, sal, 3)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunks_bound_the_forward_batch():
    model = TinyConv().eval()
    sizes = []
    model.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    x = torch.randn(3, 3, 5, 5)
    deletion_auc(model, x, torch.rand(3, 5, 5), norm=IMAGENET, steps=10, max_batch=4)
    assert max(sizes) == 4 and sum(sizes) == 3 + 3 * 11  # clean pass + 11 points per image


def test_training_flags_restored_and_eval_used():
    model = TinyConv()
    x = torch.randn(2, 3, 6, 6)
    sal = torch.rand(2, 6, 6)
    expected = all_metrics(model.eval(), x, sal, 64)
    model.train()
    model.features[1].eval()  # mixed flags come back as they were
    flags = [m.training for m in model.modules()]
    for a, b in zip(expected, all_metrics(model, x, sal, 64)):  # dropout off, BN running stats
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == flags
    assert torch.is_grad_enabled()

    class Bad(TinyConv):
        def forward(self, x):
            return super().forward(x)[:, 0]

    bad = Bad().train()
    with pytest.raises(ValueError, match=r"must return logits of shape \(2, classes\)"):
        pixel_perturbation(bad, x, sal, norm=IMAGENET)
    assert all(m.training for m in bad.modules())


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("ks", [(0,), (100,), (10, 100), (-5,), (150,), (), (float("nan"),),
                                ("10",)])
def test_k_outside_open_interval_raises(ks):
    model, x, *_ = linear_case(n=1, size=4)
    with pytest.raises(ValueError, match="k must be a percentage strictly between 0 and 100|"
                                         "at least one percentage"):
        pixel_perturbation(model, x, torch.rand(1, 4, 4), ks, norm=NORM)


@pytest.mark.parametrize("shape", [(2, 4, 5), (3, 4, 4), (2, 2, 4, 4), (2, 16), (4, 4)])
def test_saliency_shape_mismatch_raises(shape):
    model, x, *_ = linear_case(n=2, size=4)
    for fn in (pixel_perturbation, deletion_auc, insertion_auc):
        with pytest.raises(ValueError, match=r"saliency must be \(2, 4, 4\) or \(2, 1, 4, 4\)"):
            fn(model, x, torch.rand(shape), norm=NORM)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps_raise(steps):
    model, x, *_ = linear_case(n=1, size=4)
    for fn in (deletion_auc, insertion_auc):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            fn(model, x, torch.rand(1, 4, 4), norm=NORM, steps=steps)


def test_other_bad_inputs_raise():
    model, x, *_ = linear_case(n=1, size=4)
    sal = torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match=r"x must be a \(N, 3, H, W\) tensor"):
        pixel_perturbation(model, x[:, :1], sal, norm=NORM)
    with pytest.raises(ValueError, match=r"x must be a \(N, 3, H, W\) tensor"):
        deletion_auc(model, x[0], sal, norm=NORM)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        deletion_auc(model, x, sal, norm=NORM, max_batch=0)
    with pytest.raises(ValueError, match="saliency holds NaN"):
        insertion_auc(model, x, torch.full((1, 4, 4), float("nan")), norm=NORM)
    with pytest.raises(ValueError, match="blur kernel must be an odd integer"):
        insertion_auc(model, x, sal, norm=NORM, blur_kernel=4)
    with pytest.raises(ValueError, match="blur sigma must be a positive number"):
        insertion_auc(model, x, sal, norm=NORM, blur_sigma=0)
