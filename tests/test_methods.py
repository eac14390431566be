"""The seven methods with tiny backbones, and N processes × B ≡ 1 process × N·B with gloo."""

from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdcl.errors import CdclError, ConfigError
from cdcl.methods import MethodConfig, StepState, build_method
from cdcl.methods.losses import byol_loss, dino_cross_entropy, dino_pairs
from cdcl.models.backbones import ModelConfig, build_backbone
from cdcl.train import distributed as D

TINY_VIT = ModelConfig(
    arch="vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path=0.1
)
TINY_RESNET = ModelConfig(arch="resnet18")
NAMES = ["supervised", "dino", "dino_cb", "cdcl", "cdcl_same_batch", "byol", "byol_cb"]


def _mcfg(name: str, **kw) -> MethodConfig:
    small = dict(
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        head_bn=True,
        byol_proj_hidden=32,
        byol_proj_dim=16,
        byol_pred_hidden=32,
    )
    return MethodConfig(name=name, **{**small, **kw})


def _build(name: str, model: ModelConfig = TINY_VIT, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_method(
        _mcfg(name, **kw),
        model,
        in_chans=5,
        img_size=32,
        n_classes=4,
        n_batches=3,
        batch_shares=torch.tensor([0.5, 0.3, 0.2]),
    )


def _batch(method, b: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = method.n_views
    views = [torch.randn(b, 5, 28, 28, generator=g) for _ in range(min(n, 2))]
    views += [torch.randn(b, 5, 14, 14, generator=g) for _ in range(n - 2)]
    return {
        "views": views,
        "label": torch.randint(0, 4, (b,), generator=g),
        "batch_id": torch.randint(0, 3, (b,), generator=g),
        "partner_batch_id": torch.randint(0, 3, (b,), generator=g),
    }


def _teacher_student_pairs(m):
    if hasattr(m, "teacher_backbone"):
        return [(m.teacher_backbone, m.student_backbone), (m.teacher_head, m.student_head)]
    if hasattr(m, "target_backbone"):
        return [(m.target_backbone, m.online_backbone), (m.target_projector, m.projector)]
    return []


def _dist(m) -> float:
    return sum(
        float((pt - ps).detach().pow(2).sum())
        for t, s in _teacher_student_pairs(m)
        for pt, ps in zip(t.parameters(), s.parameters())
    )


@pytest.mark.parametrize("model", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
@pytest.mark.parametrize("name", NAMES)
def test_step_is_finite_and_teacher_follows(name: str, model: ModelConfig) -> None:
    torch.set_num_threads(1)
    m = _build(name, model)
    m.train()
    assert m.view_kind == {"supervised": "single", "byol": "byol", "byol_cb": "byol"}.get(
        name, "dino"
    )
    assert m.cross_batch == (name in ("dino_cb", "byol_cb", "cdcl", "cdcl_same_batch"))
    assert m.pairing == ("same_batch" if name == "cdcl_same_batch" else "cross_batch")
    loss, logs = m.loss(_batch(m), StepState(step=0, epoch=0.0))
    assert torch.isfinite(loss) and math.isfinite(logs["loss"]) and "probe_acc" in logs
    loss.backward()
    params = list(m.student_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    probe_ids = {id(p) for p in m.probe.parameters()}
    assert not probe_ids & {id(p) for p in params}  # the probe has its own optimiser
    assert m.probe.weight.grad is not None
    groups = m.param_groups(0.04)
    grouped = [p for g in groups for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in params} and len(grouped) == len(params)
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
    opt = torch.optim.SGD(params, lr=0.5)
    opt.step()
    before = _dist(m)
    m.after_step(StepState(ema_momentum=0.5))
    if name != "supervised":
        assert _dist(m) < 0.5 * before  # EMA with m = 0.5 quarters the squared distance
    with torch.no_grad():
        m.eval()
        emb = m.embed(torch.randn(3, 5, 32, 32))
    assert emb.shape == (3, m.feat_dim)


@pytest.mark.parametrize("name", ["dino", "cdcl", "byol", "supervised"])
def test_probe_never_changes_backbone_gradients(name: str) -> None:
    torch.set_num_threads(1)
    m = _build(name, TINY_VIT)
    m.train()
    batch = _batch(m)
    state = copy.deepcopy(m.state_dict())

    def grads() -> list[torch.Tensor]:
        m.load_state_dict(state)
        m.zero_grad(set_to_none=True)
        torch.manual_seed(123)  # same drop-path masks in both runs
        loss, _ = m.loss(batch, StepState(epoch=1.0))
        loss.backward()
        return [p.grad.clone() for p in m.student_parameters()]

    g1 = grads()
    probe_grad_1 = m.probe.weight.grad.clone()
    state["probe.weight"] = torch.randn_like(state["probe.weight"]) * 10
    state["probe.bias"] = torch.randn_like(state["probe.bias"]) * 10
    g2 = grads()
    assert not torch.allclose(probe_grad_1, m.probe.weight.grad)  # the probe itself did change
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    a = _build(name, TINY_VIT, seed=0)
    a.train()
    if name != "supervised":
        a.loss(_batch(a), StepState())  # moves the centres away from zero
    b = _build(name, TINY_VIT, seed=1)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    if name in ("dino", "dino_cb"):
        assert a.center.abs().sum() > 0 and torch.equal(a.center, b.center)
    if name in ("cdcl", "cdcl_same_batch"):
        assert a.batch_centers.abs().sum() > 0
    x = torch.randn(2, 5, 32, 32)
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a.embed(x), b.embed(x))


def test_dino_family_structure() -> None:
    dino, cdcl, dcb = _build("dino"), _build("cdcl"), _build("dino_cb")
    assert (dino.per_batch_centering, dino.use_barlow, dino.cross_batch) == (False, False, False)
    assert (dcb.per_batch_centering, dcb.use_barlow, dcb.cross_batch) == (False, False, True)
    assert (cdcl.per_batch_centering, cdcl.use_barlow, cdcl.cross_batch) == (True, True, True)
    assert dino.n_views == 8 and tuple(cdcl.batch_centers.shape) == (3, 64)
    last = dino.last_layer_parameters()
    assert last and {id(p) for p in last} <= {id(p) for p in dino.student_parameters()}
    assert _build("byol").last_layer_parameters() == []
    over = _build("cdcl", barlow=False)  # switches are overridable
    assert not over.use_barlow and over.per_batch_centering
    with pytest.raises(ConfigError):
        _build("simclr")


def test_cdcl_same_batch_is_cdcl_but_for_the_pairing() -> None:
    """Same switches, networks and loss as CDCL; only the partner the data draws differs."""
    cdcl, ctrl = _build("cdcl", seed=3), _build("cdcl_same_batch", seed=3)
    flags = ("per_batch_centering", "use_barlow", "cross_batch", "n_views", "view_kind")
    assert [getattr(ctrl, f) for f in flags] == [getattr(cdcl, f) for f in flags]
    assert (cdcl.pairing, ctrl.pairing) == ("cross_batch", "same_batch")
    sd_a, sd_b = cdcl.state_dict(), ctrl.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    batch = _batch(cdcl)
    cdcl.train(), ctrl.train()
    torch.manual_seed(0)
    loss_a, logs_a = cdcl.loss(batch, StepState(epoch=1.0))
    torch.manual_seed(0)
    loss_b, logs_b = ctrl.loss(batch, StepState(epoch=1.0))
    assert torch.equal(loss_a, loss_b) and logs_a == logs_b
    assert torch.equal(cdcl.batch_centers, ctrl.batch_centers)
    with pytest.raises(ConfigError, match="pairing `same_batch` needs a partner"):
        _build("dino", pairing="same_batch")


def test_teacher_temperature_from_epoch_or_trainer() -> None:
    m = _build("dino")
    assert m.teacher_temp(StepState(epoch=0.0)) == pytest.approx(0.04)
    assert m.teacher_temp(StepState(epoch=5.0)) == pytest.approx(0.055)
    assert m.teacher_temp(StepState(epoch=50.0)) == pytest.approx(0.07)
    assert m.teacher_temp(StepState(epoch=0.0, teacher_temp=0.06)) == pytest.approx(0.06)


@pytest.mark.parametrize("cross", [False, True])
def test_cdcl_per_batch_centring_and_total(cross: bool) -> None:
    m = _build("cdcl", only_cross_domain=cross)
    m.eval()  # eval: centres are not updated, drop-path off, head BN uses running stats
    torch.manual_seed(0)
    m.batch_centers.copy_(torch.randn_like(m.batch_centers))
    batch = _batch(m)
    _, logs = m.loss(batch, StepState(epoch=2.0))
    with torch.no_grad():
        t = m.teacher_head(m.teacher_backbone(torch.cat(batch["views"][:2]))).view(2, 6, -1)
        s = m._student_logits(batch["views"])
    # Centre each teacher row by hand with its own image's batch centre.
    t_c = t.clone()
    for r in range(6):
        t_c[0, r] -= m.batch_centers[batch["batch_id"][r]]
        t_c[1, r] -= m.batch_centers[batch["partner_batch_id"][r]]
    pairs = dino_pairs(8, cross)
    assert len(pairs) == (8 if cross else 14)
    ce, _ = dino_cross_entropy(s, t_c, 0.1, m.teacher_temp(StepState(epoch=2.0)), pairs)
    assert logs["dino_loss"] == pytest.approx(float(ce) / math.log(64), rel=1e-5)
    w = 0.75
    assert logs["loss"] == pytest.approx(
        (1 - w) * logs["dino_loss"] + w * logs["barlow_loss"], rel=1e-5
    )
    before = m.batch_centers.clone()
    m.train()
    m.loss(batch, StepState(epoch=2.0))
    assert not torch.equal(before, m.batch_centers)


def test_byol_projector_ends_in_batch_norm_and_views_are_normalised_apart() -> None:
    torch.set_num_threads(1)
    from cdcl.models.heads import GlobalBatchNorm1d

    m = _build("byol_cb", TINY_RESNET)  # ResNet: the backbone's own BNs see one view at a time
    assert isinstance(
        m.projector.net[-1], GlobalBatchNorm1d
    )  # the reference implementation's Linear → BN(256)
    assert not isinstance(m.predictor.net[-1], GlobalBatchNorm1d)
    m.train()
    batch = _batch(m, b=8)
    a, b = batch["views"]
    b.mul_(3.0).add_(2.0)  # view B from "another batch": a different intensity scale
    state = copy.deepcopy(m.state_dict())
    _, logs = m.loss(batch, StepState())
    m.load_state_dict(state)  # undo the running-stat updates of the call above

    def run(views: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        with torch.no_grad():
            h = [m.online_backbone(x) for x in views]
            z = [m.projector(x) for x in h]
            p = [m.predictor(x) for x in z]
            t = [m.target_projector(m.target_backbone(x)) for x in views]
        return p, t, z

    p, t, z = run([a, b])
    for zv in z:  # per-view output BN: every projection dimension standardised within its view
        assert torch.allclose(zv.mean(0), torch.zeros(zv.shape[1]), atol=1e-5)
        assert torch.allclose(zv.var(0, unbiased=False), torch.ones(zv.shape[1]), atol=1e-3)
    by_view = float(byol_loss(p[0], p[1], t[0], t[1]))
    assert logs["loss"] == pytest.approx(by_view, rel=1e-5)
    m.load_state_dict(state)
    pc, tc, _ = run([torch.cat([a, b])])  # both views in one pass: BN statistics mixed
    mixed = float(byol_loss(pc[0][:8], pc[0][8:], tc[0][:8], tc[0][8:]))
    assert abs(mixed - by_view) > 1e-3


def test_missing_weights_file_is_a_cdcl_error(tmp_path: Path) -> None:
    cfg = ModelConfig(**{**TINY_VIT.__dict__, "weights": str(tmp_path / "nope.pth")})
    with pytest.raises(CdclError, match="not found"):
        build_backbone(cfg, 5, 32)


def test_weights_from_local_rgb_file_are_adapted(tmp_path: Path) -> None:
    rgb, _ = build_backbone(TINY_VIT, 3, 32)
    f = tmp_path / "w.pth"
    torch.save({"model": {f"module.{k}": v for k, v in rgb.state_dict().items()}}, f)
    cfg = ModelConfig(**{**TINY_VIT.__dict__, "weights": str(f)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key matches: no missing/unexpected warning
        net, dim = build_backbone(cfg, 5, 32)
    assert dim == 32
    assert net.load_report["adapted"] == ["patch_embed.proj.weight"]
    assert net.load_report["missing"] == [] and net.load_report["unexpected"] == []
    w_rgb = rgb.state_dict()["patch_embed.proj.weight"]
    w5 = net.state_dict()["patch_embed.proj.weight"]
    assert w5.shape[1] == 5
    # A grey image (all channels equal) gives the same patch embedding as before.
    assert torch.allclose(w5.sum(1), w_rgb.sum(1), atol=1e-6)
    assert torch.equal(
        net.state_dict()["blocks.0.attn.qkv.weight"], rgb.state_dict()["blocks.0.attn.qkv.weight"]
    )


# --- distributed equivalence --------------------------------------------------------------------


DIST_CASES = {
    "cdcl_gram": ("cdcl", {}),  # global N = 8 < K = 64: Barlow via gathered Gram matrices
    "cdcl_einsum": ("cdcl", {"out_dim": 4}),  # N >= K: all-reduced K×K cross-correlations
    "cdcl_cross": ("cdcl", {"only_cross_domain": True}),
    "dino": ("dino", {}),
    "byol_cb": ("byol_cb", {}),  # GlobalBatchNorm1d per view in projector and predictor
}
DIST_MODEL = ModelConfig(**{**TINY_VIT.__dict__, "drop_path": 0.0})  # no random drop masks


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case, (name, kw) in DIST_CASES.items():
            m = _build(name, DIST_MODEL, **kw)
            m.train()
            full = _batch(m, b=8)
            half = slice(rank * 4, rank * 4 + 4)
            batch = {
                k: [v[half] for v in full["views"]] if k == "views" else full[k][half] for k in full
            }
            loss, logs = m.loss(batch, StepState(epoch=3.0))
            loss.backward()
            grads = [p.grad.clone() for p in m.student_parameters()]
            for g in grads:
                dist.all_reduce(g)
                g /= world  # what DDP does
            vals = torch.tensor([logs["loss"], logs.get("barlow_loss", 0.0)], dtype=torch.float64)
            dist.all_reduce(vals)
            vals /= world
            if rank == 0:
                torch.save(
                    {
                        "vals": vals,
                        "grads": grads,
                        "center": getattr(m, "center", torch.zeros(1)),
                        "bc": getattr(m, "batch_centers", torch.zeros(1)),
                    },
                    os.path.join(out_dir, f"{case}.pt"),
                )
        if rank == 0:
            # cdcl.train.distributed (imported with this module, so before the group) is what
            # lets cleanup free the group: no gloo worker thread may outlive it.
            D.cleanup()
            Path(out_dir, "threads_after_cleanup").write_text(str(_gloo_threads()))
    finally:
        D.cleanup()


def _gloo_threads() -> int:
    """Live gloo worker threads of this process, read from /proc (Linux)."""
    names = {"pt_gloo_runloop", "gloo_tcp_loop"}
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            count += Path("/proc/self/task", tid, "comm").read_text().strip() in names
        except OSError:  # the thread ended while we looked
            continue
    return count


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "threads_after_cleanup").read_text() == "0"
    for case, (name, kw) in DIST_CASES.items():
        got = torch.load(tmp_path / f"{case}.pt", weights_only=True)
        m = _build(name, DIST_MODEL, **kw)
        m.train()
        loss, logs = m.loss(_batch(m, b=8), StepState(epoch=3.0))
        loss.backward()
        ref_grads = [p.grad for p in m.student_parameters()]
        assert float(got["vals"][0]) == pytest.approx(logs["loss"], rel=1e-5), case
        if name == "cdcl":
            assert float(got["vals"][1]) == pytest.approx(logs["barlow_loss"], rel=1e-5), case
            assert torch.allclose(got["bc"], m.batch_centers, atol=1e-6), case
            assert m.batch_centers.abs().sum() > 0
        elif name == "dino":
            assert torch.allclose(got["center"], m.center, atol=1e-6)
            assert m.center.abs().sum() > 0
        # float32 sums in another order: compare relative to the gradients' overall scale (some,
        # e.g. biases feeding a BatchNorm, are zero up to rounding).
        scale = max(float(r.abs().max()) for r in ref_grads)
        assert len(got["grads"]) == len(ref_grads)
        for g, r in zip(got["grads"], ref_grads):
            assert float((g - r).abs().max()) <= 1e-5 * scale, case


@pytest.mark.parametrize("name", ["cdcl", "cdcl_same_batch"])
def test_cdcl_step_on_a_loaded_training_batch(random_dataset: Path, name: str) -> None:
    torch.set_num_threads(1)
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.training_set import TrainingSet
    from cdcl.data.views import ViewsConfig

    ds = open_dataset(random_dataset)
    s = ds.samples
    rows = np.arange(len(s))
    label_of = {t: k for k, t in enumerate(sorted(s["treatment"].unique()))}
    batch_of = {b: k for k, b in enumerate(sorted(s["batch"].unique()))}
    m = build_method(
        _mcfg(name),
        TINY_VIT,
        in_chans=len(ds.channels),
        img_size=ds.image_size[0],
        n_classes=len(label_of),
        n_batches=len(batch_of),
        batch_shares=torch.tensor([1 / 3] * 3),
    )
    views = ViewsConfig()
    ts = TrainingSet(
        ds, rows, label_of, batch_of, views, m.view_kind, m.cross_batch, 0, pairing=m.pairing
    )
    loader = torch.utils.data.DataLoader(
        ts, batch_size=6, shuffle=True, num_workers=2, collate_fn=ts.collate
    )
    batch = next(iter(loader))
    assert len(batch["views"]) == m.n_views
    same = batch["batch_id"] == batch["partner_batch_id"]
    assert bool(same.all() if name == "cdcl_same_batch" else (~same).all())
    m.train()
    loss, logs = m.loss(batch, StepState())
    loss.backward()
    assert torch.isfinite(loss) and logs["barlow_loss"] > 0


def test_weights_safetensors_pos_embed_resampling_and_wrong_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    small, _ = build_backbone(TINY_VIT, 5, 32)  # 4×4 patch grid
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(f))
    cfg = ModelConfig(**{**TINY_VIT.__dict__, "weights": str(f)})
    net, _ = build_backbone(cfg, 5, 64)  # 8×8 grid: position embedding resampled
    assert net.load_report["adapted"] == ["pos_embed"]
    assert net.state_dict()["pos_embed"].shape[1] == 1 + 64
    res = tmp_path / "resnet.pth"
    torch.save(build_backbone(TINY_RESNET, 5, 32)[0].state_dict(), res)
    with pytest.raises(CdclError, match="no key matches"):
        build_backbone(ModelConfig(**{**TINY_VIT.__dict__, "weights": str(res)}), 5, 32)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CdclError, match="cannot be read"):
        build_backbone(ModelConfig(**{**TINY_VIT.__dict__, "weights": str(junk)}), 5, 32)
