"""Every model family behind the one encoder interface: each loads a random file in each of its
formats strictly, gives finite outputs of the documented shapes, and runs one step of distillation
(as teacher, where it offers token maps), linear probe, U-Net fine-tuning, embed and ONNX export
on real DDTI/BUSI frames. A toy family registered here runs `embed` through the registry alone.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import (
    HIERA,
    TINY,
    TINY_TEACHER_KWARGS,
    fake_student_run,
    perturbed_official,
    timm_to_sam2_official,
)
from lightning_fabric import Fabric
from PIL import Image
from safetensors.torch import load_file, save_file

from sonodistill.config import packaged_configs, parse_config, save_config
from sonodistill.data.listing import collect_frames, frames_tensor
from sonodistill.deploy.onnx_utils import export_onnx
from sonodistill.distill.augment import build_augmentation
from sonodistill.distill.config import LOSSES, DistillConfig
from sonodistill.distill.recipe import train_step
from sonodistill.errors import UserError
from sonodistill.evaluate.embed import EmbedConfig, embed, load_embeddings
from sonodistill.evaluate.heads import WithPreprocess, build_model, trainable_parameters
from sonodistill.evaluate.suite import SuiteConfig, plan
from sonodistill.evaluate.train import SegLoss
from sonodistill.models import Student, StudentConfig, Teacher, TeacherConfig, to_model_input
from sonodistill.models.encoders import (
    FAMILIES,
    Encoder,
    EncoderSpec,
    InputSizeError,
    build_encoder,
    encoder_label,
    encoder_recipe,
    resolve_spec,
    weights_file,
)
from sonodistill.models.specs import STUDENT_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
CONVNEXT = {"depths": (1, 1, 2, 1), "dims": (16, 24, 32, 40)}
BEIT = {"embed_dim": 48, "depth": 2, "num_heads": 2, "img_size": SIZE}


# --- files in each family's layouts, written from the architecture --------------------------------


def convnext_official(depths, dims, seed=0) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 ConvNeXt checkpoint layout (with the `norms.3` alias of `norm`)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else 1 / math.sqrt(math.prod(shape[1:]) or 1)
        return torch.randn(shape, generator=gen) * scale

    sd = {}
    for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):
        ds = f"downsample_layers.{i}."
        if i == 0:
            sd |= {ds + "0.weight": rnd(d, 3, 4, 4), ds + "0.bias": rnd(d, scale=0.1)}
            sd |= {ds + "1.weight": 1 + rnd(d, scale=0.1), ds + "1.bias": rnd(d, scale=0.1)}
        else:
            p = dims[i - 1]
            sd |= {ds + "0.weight": 1 + rnd(p, scale=0.1), ds + "0.bias": rnd(p, scale=0.1)}
            sd |= {ds + "1.weight": rnd(d, p, 2, 2), ds + "1.bias": rnd(d, scale=0.1)}
        for j in range(depth):
            b = f"stages.{i}.{j}."
            sd |= {
                b + "gamma": 0.5 + rnd(d, scale=0.1),
                b + "dwconv.weight": rnd(d, 1, 7, 7),
                b + "dwconv.bias": rnd(d, scale=0.1),
                b + "norm.weight": 1 + rnd(d, scale=0.1),
                b + "norm.bias": rnd(d, scale=0.1),
                b + "pwconv1.weight": rnd(4 * d, d),
                b + "pwconv1.bias": rnd(4 * d, scale=0.1),
                b + "pwconv2.weight": rnd(d, 4 * d),
                b + "pwconv2.bias": rnd(d, scale=0.1),
            }
    sd["norm.weight"], sd["norm.bias"] = 1 + rnd(dims[-1], scale=0.1), rnd(dims[-1], scale=0.1)
    sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"], sd["norm.bias"]
    return sd


def convnext_reference(sd: dict, x: torch.Tensor):
    """Meta's ConvNeXt forward from its published architecture: (normed pooled vector, stage
    maps, last map through the final norm)."""

    def ln_channels(u, name):
        mean = u.mean(1, keepdim=True)
        var = (u - mean).pow(2).mean(1, keepdim=True)
        u = (u - mean) / torch.sqrt(var + 1e-6)
        return sd[name + ".weight"][:, None, None] * u + sd[name + ".bias"][:, None, None]

    stages = []
    for i in range(4):
        ds = f"downsample_layers.{i}."
        if i == 0:
            x = ln_channels(F.conv2d(x, sd[ds + "0.weight"], sd[ds + "0.bias"], stride=4), ds + "1")
        else:
            x = F.conv2d(ln_channels(x, ds + "0"), sd[ds + "1.weight"], sd[ds + "1.bias"], stride=2)
        j = 0
        while f"stages.{i}.{j}.gamma" in sd:
            b = f"stages.{i}.{j}."
            d = x.shape[1]
            y = F.conv2d(x, sd[b + "dwconv.weight"], sd[b + "dwconv.bias"], padding=3, groups=d)
            y = F.layer_norm(
                y.permute(0, 2, 3, 1), (d,), sd[b + "norm.weight"], sd[b + "norm.bias"], 1e-6
            )
            y = F.linear(
                F.gelu(F.linear(y, sd[b + "pwconv1.weight"], sd[b + "pwconv1.bias"])),
                sd[b + "pwconv2.weight"],
                sd[b + "pwconv2.bias"],
            )
            x = x + (sd[b + "gamma"] * y).permute(0, 3, 1, 2)
            j += 1
        stages.append(x)
    d = x.shape[1]

    def norm(u):
        return F.layer_norm(u, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)

    last = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return norm(x.mean(dim=(-2, -1))), stages, last


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{family: [(format, EncoderSpec), ...]} random weights files in every supported layout."""
    tmp = tmp_path_factory.mktemp("families")
    out = {}
    torch.save(perturbed_official(TINY, seed=21), tmp / "dinov3_official.pth")
    out["dinov3"] = [
        (
            "official",
            EncoderSpec(
                "dinov3",
                "",
                str(tmp / "dinov3_official.pth"),
                "DINOv3-tiny",
                dict(TINY_TEACHER_KWARGS),
            ),
        ),
    ]
    torch.save(convnext_official(CONVNEXT["depths"], CONVNEXT["dims"]), tmp / "cnx.pth")
    cnx = EncoderSpec("dinov3-convnext", "convnext_tiny", str(tmp / "cnx.pth"), "CNX", CONVNEXT)
    timm_file = tmp / "convnext_tiny.dinov3_lvd1689m.safetensors"
    save_file(build_encoder(cnx).backbone.state_dict(), str(timm_file))
    out["dinov3-convnext"] = [("official", cnx), ("timm", cnx.replace(weights=str(timm_file)))]
    torch.manual_seed(22)
    hiera = build_encoder(EncoderSpec("sam2", "sam2_hiera_tiny", "random", "SAM2", HIERA))
    save_file(hiera.backbone.state_dict(), str(tmp / "sam2_timm.safetensors"))
    torch.save(timm_to_sam2_official(hiera.backbone.state_dict()), tmp / "sam2.1_hiera_tiny.pt")
    sam2 = hiera.spec.replace(weights=str(tmp / "sam2.1_hiera_tiny.pt"))
    out["sam2"] = [
        ("official", sam2),
        ("timm", sam2.replace(weights=str(tmp / "sam2_timm.safetensors"))),
    ]
    torch.manual_seed(23)
    beit = timm.create_model("beit_base_patch16_224", num_classes=0, **BEIT)
    usfm = {"encoder." + k: v for k, v in beit.state_dict().items()}  # a USFM-style ViT-B file
    for i, block in enumerate(beit.blocks):
        usfm[f"encoder.blocks.{i}.attn.relative_position_index"] = (
            block.attn.relative_position_index
        )
    usfm |= {"encoder.mask_token": torch.zeros(1, 1, 48), "lm_head.weight": torch.zeros(8, 48)}
    torch.save(usfm, tmp / "usfm.pth")
    options = {"key_map": [["^encoder\\.", ""]], "drop": ["^lm_head\\.", "^mask_token$"]}
    out["vit"] = [
        (
            "user key map",
            EncoderSpec(
                "vit", "beit_base_patch16_224", str(tmp / "usfm.pth"), "USFM", BEIT, options
            ),
        )
    ]
    torch.manual_seed(24)
    r18 = timm.create_model("resnet18", num_classes=10)  # a classifier checkpoint
    torch.save(r18.state_dict(), tmp / "r18.pth")
    out["timm"] = [("timm", EncoderSpec("timm", "resnet18", str(tmp / "r18.pth"), "R18"))]
    out["_sources"] = {"beit": beit, "r18": r18}
    return out


def all_specs(files):
    return [(f, fmt, spec) for f, items in files.items() if f in FAMILIES for fmt, spec in items]


@pytest.fixture(scope="module")
def ddti(shared_data):
    """Four real DDTI frames (64 px) with their masks."""
    images = sorted((shared_data / "ddti" / "image").glob("*.PNG"))[:4]
    x = torch.stack([_png(p, Image.BILINEAR) for p in images]).unsqueeze(1) / 255
    y = torch.stack([_png(p.parent.parent / "mask" / p.name, Image.NEAREST) > 127 for p in images])
    return x, y.long()


def _png(path, resample) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(
            np.asarray(img.convert("L").resize((SIZE, SIZE), resample)).copy()
        ).float()


# --- formats --------------------------------------------------------------------------------------


def test_every_family_and_format_loads_strictly_with_finite_documented_outputs(files, ddti):
    x = to_model_input(ddti[0])
    seen = set()
    for family, fmt, spec in all_specs(files):
        encoder = build_encoder(spec).eval()
        report = encoder.load_report
        assert report is not None and report.format.startswith(fmt), (family, report)
        with torch.no_grad():
            last, pooled, pyramid = encoder(x), encoder.pooled(x), encoder.pyramid(x)
            vectors = encoder.vectors(x)
        assert last.shape[:2] == (4, encoder.out_channels) and torch.isfinite(last).all()
        assert pooled.shape == (4, encoder.pooled_dim) and torch.isfinite(pooled).all()
        assert [m.shape[1] for m in pyramid] == encoder.pyramid_channels
        assert [m.shape[-1] for m in pyramid] == [SIZE // s for s in (2, 4, 8, 16, 32)]
        assert vectors["pooled"].shape == (4, encoder.out_channels)
        seen.add(family)
    assert seen == set(FAMILIES) - {"student"}  # built from a run folder: test_student_runs_*


def test_dinov3_convnext_matches_metas_architecture_in_both_layouts(files, ddti):
    x = to_model_input(ddti[0])
    sd = torch.load(files["dinov3-convnext"][0][1].weights)
    cls, stages, last = convnext_reference(sd, x)
    for fmt, spec in files["dinov3-convnext"]:
        encoder = build_encoder(spec).eval()
        with torch.no_grad():
            assert (encoder.pooled(x) - cls).abs().max() < 1e-5, fmt
            assert (encoder.vectors(x)["cls"] - cls).abs().max() < 1e-5, fmt
            maps = encoder.token_maps(x, 2)
        assert (maps[0] - stages[2]).abs().max() < 1e-5 and (maps[1] - last).abs().max() < 1e-5


def test_sam2_official_checkpoint_keeps_the_trunk_only(files):
    (_, official), (_, timm_layout) = files["sam2"]
    a, b = build_encoder(official), build_encoder(timm_layout)
    for key, value in a.backbone.state_dict().items():
        assert torch.equal(value, b.backbone.state_dict()[key]), key
    assert a.load_report.dropped == {
        "image_encoder.neck": 1,
        "sam_mask_decoder": 1,
        "memory_attention": 1,
    }
    assert a.input_multiple == 32
    with pytest.raises(InputSizeError, match="multiples of 32"):
        a.check_input_size(48)


def test_usfm_style_vit_loads_through_its_key_map(files):
    spec = files["vit"][0][1]
    encoder = build_encoder(spec)
    source = files["_sources"]["beit"].state_dict()
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, source[key]), key
    assert encoder.load_report.dropped == {"drop patterns": 2}
    with pytest.raises(InputSizeError, match="takes exactly 64x64"):
        encoder.check_input_size(128)


def test_meta_convnext_file_starts_a_convnext_student(tmp_path):
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m.pth"
    torch.save(convnext_official((3, 3, 9, 3), (96, 192, 384, 768), seed=5), path)  # ConvNeXt-T
    student = Student(StudentConfig(name="convnext_tiny", weights=str(path)), out_channels=8)
    reference = build_encoder(f"dinov3-convnext:convnext_tiny={path}")  # the same file
    assert reference.load_report.format == "official"
    for key, value in reference.backbone.state_dict().items():
        assert torch.equal(value, student.backbone.state_dict()[key]), key


# --- one step of each job -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dinov3", "dinov3-convnext", "vit"])
def test_distill_one_step_with_each_teacher_family(files, ddti, family):
    spec = files[family][0][1]
    teacher = Teacher(
        TeacherConfig(
            family=family,
            name=spec.name,
            weights=spec.weights,
            model_kwargs=spec.model_kwargs,
            options=spec.options,
        )
    )
    student = Student(StudentConfig(name="resnet18"), teacher.out_channels)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    fabric = Fabric(accelerator="cpu", devices=1)
    images = (ddti[0] * 255).to(torch.uint8)
    before = student.projection.weight.detach().clone()
    augment = build_augmentation("us", SIZE)
    objective = LOSSES.get("token_mse")
    loss, metrics = train_step(fabric, teacher, student, augment, objective, images, True)
    optimizer.step()
    assert math.isfinite(loss.item()) and -1 <= metrics["cosine"].item() <= 1
    assert not torch.equal(student.projection.weight, before)
    assert teacher(to_model_input(ddti[0])).shape[1] == teacher.out_channels


@pytest.mark.parametrize("job", ["linear seg", "linear cls", "unet"])
def test_probe_and_unet_steps_for_every_family(files, ddti, job):
    x, y = ddti
    for family, _, spec in all_specs(files):
        encoder = build_encoder(spec)
        if job == "linear cls":
            model = build_model(encoder, "cls", "linear", 3)
            loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
        else:
            protocol = "linear" if job == "linear seg" else "finetune"
            model = build_model(encoder, "seg", protocol, 2, seg_decoder="unet")
            out = model(x)
            assert out.shape == (4, 1, SIZE, SIZE)
            loss = SegLoss(2)(out, y)
        params = trainable_parameters(model)
        encoder_params = {id(p) for p in encoder.parameters()}
        assert any(id(p) in encoder_params for p in params) == (job == "unet"), family
        torch.optim.AdamW(params, lr=1e-3).zero_grad()
        loss.backward()
        head = [p for p in params if id(p) not in encoder_params]
        assert math.isfinite(loss.item()) and all(p.grad is not None for p in head), family
        learns = any(p.grad is not None for p in encoder.parameters())
        assert learns == (job == "unet"), family  # fine-tuning reaches the encoder


def test_embed_with_every_family_on_real_frames(files, shared_data, tmp_path):
    specs = [spec for _, fmt, spec in all_specs(files) if fmt != "timm" or spec.family == "timm"]
    cfg = EmbedConfig(
        sources=[f"ddti={shared_data / 'ddti'}"],
        encoders=[{**spec.__dict__} for spec in specs],
        out=str(tmp_path / "emb"),
        image_size=SIZE,
        max_per_source=3,
    )
    meta, arrays = load_embeddings(embed(cfg))
    assert len(meta) == 3
    for spec in specs:
        assert arrays[spec.label].shape[0] == 3 and np.isfinite(arrays[spec.label]).all()
    assert arrays["DINOv3-tiny.cls"].shape == (3, 48) and arrays["CNX.cls"].shape == (3, 40)
    assert arrays["USFM.cls"].shape == (3, 48) and "SAM2.cls" not in arrays


def test_onnx_export_of_every_family_matches_pytorch(files, shared_data, tmp_path):
    """The backbone (last feature map) and its U-Net, grey frames in, on real frames."""
    frames = frames_tensor(collect_frames([f"ddti={shared_data / 'ddti'}"], 2), SIZE)
    for family, fmt, spec in all_specs(files):
        if fmt == "timm" and family != "timm":
            continue  # the same weights as the family's other format
        encoder = build_encoder(spec)
        models = {
            "features": WithPreprocess(encoder),
            "logits": build_model(encoder, "seg", "finetune", 2, "unet"),
        }
        for output, model in models.items():
            model.eval()
            path = export_onnx(model, tmp_path / f"{family}.onnx", SIZE, 18, "legacy", (output,))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: frames.numpy()})[0]
            with torch.no_grad():
                expected = model(frames).numpy()
            assert got.shape == expected.shape, (family, output)
            assert np.abs(got - expected).max() < 1e-3, (family, output)


# --- suites -------------------------------------------------------------------------------------


def test_every_suite_has_a_dinov3_convnext_baseline_and_fm_compare_lays_out_table8():
    families = {}
    for name in [n for n in packaged_configs() if n.startswith("suites/")]:
        cfg = parse_config(SuiteConfig, ["--config", name], "test")
        families[name] = {r.encoder.family for r in plan(cfg)}
        assert "dinov3-convnext" in families[name], name
    table8 = parse_config(SuiteConfig, ["--config", "suites/paper_fm_compare"], "test")
    assert families["suites/paper_fm_compare"] == {
        "dinov3",
        "sam2",
        "vit",
        "dinov3-convnext",
        "student",
    }
    assert table8.tasks == ["ddti_seg"] and table8.protocols == ["finetune"]
    assert (table8.train.seg_image_size, table8.train.epochs, table8.train.lr) == (256, 50, 1e-4)
    usfm = next(e for e in table8.encoders if isinstance(e, dict))
    assert usfm["name"] == "beit_base_patch16_224" and usfm["options"]["key_map"]


# --- registering a family -------------------------------------------------------------------------


class ToyEncoder(Encoder):
    """A 2-layer CNN family: one module (this class) plus one registry line."""

    family = "toy"
    title = "toy CNN"
    default_name = "toy"
    names = ("toy",)

    @classmethod
    def create(cls, spec: EncoderSpec) -> torch.nn.Module:
        width = spec.model_kwargs.get("width", 8)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 4, stride=4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 8, stride=8),
        )
        net.num_features = 2 * width
        net.forward_features = net.forward
        net.feature_info = [{"num_chs": 2 * width, "reduction": 32}]
        net.forward_intermediates = lambda x, intermediates_only=True: [net(x)]
        return net

    @classmethod
    def default_weights(cls, spec: EncoderSpec) -> str | None:
        return None


def test_a_toy_family_registered_in_one_line_runs_embed(shared_data, tmp_path):
    FAMILIES.register("toy", ToyEncoder)
    try:
        cfg = EmbedConfig(
            sources=[f"ddti={shared_data / 'ddti'}"],
            encoders=["toy:@Toy"],
            out=str(tmp_path / "emb"),
            image_size=SIZE,
            max_per_source=2,
        )
        meta, arrays = load_embeddings(embed(cfg))
        assert arrays["Toy"].shape == (2, 16) and np.isfinite(arrays["Toy"]).all()
    finally:
        FAMILIES.unregister("toy")


# --- students from their run folders -------------------------------------------------------------


def test_student_runs_build_through_the_registry_in_any_family(tmp_path):
    """`student:RUN` is a family: a timm run and a DINOv3 ConvNeXt run (written as distill
    writes them) build the run's family with the distilled weights; labels, recipes and
    weights files come from the same place."""
    timm_run = fake_student_run(tmp_path / "r18")
    encoder = build_encoder(f"student:{timm_run}")
    assert type(encoder).family == "timm" and encoder.spec.name == "resnet18"
    disk = load_file(str(timm_run / STUDENT_WEIGHTS))
    assert all(torch.equal(encoder.backbone.state_dict()[k], v) for k, v in disk.items())
    assert encoder_label(f"student:{timm_run}") == "r18-distill"
    assert encoder_label(f"student:{timm_run}@Mine") == "Mine"
    assert encoder_recipe(f"student:{timm_run}")["student"] == "resnet18"
    assert weights_file(f"student:{timm_run}") == timm_run / STUDENT_WEIGHTS

    convnext_run = tmp_path / "cnx"
    cfg = StudentConfig(family="dinov3-convnext", name="convnext_tiny", model_kwargs=CONVNEXT)
    torch.manual_seed(3)
    student = Student(cfg, out_channels=8)
    convnext_run.mkdir()
    save_file(student.backbone_state_dict(), str(convnext_run / STUDENT_WEIGHTS))
    save_config(DistillConfig(student=cfg), convnext_run / "config.yaml")
    resolved = resolve_spec(f"student:{convnext_run}@CNX")
    assert (resolved.family, resolved.name, resolved.label) == (
        "dinov3-convnext",
        "convnext_tiny",
        "CNX",
    )
    encoder = build_encoder(f"student:{convnext_run}").eval()
    assert type(encoder).family == "dinov3-convnext" and encoder.load_report is not None
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(encoder(x), student.eval().encoder(x), atol=1e-6)
    assert encoder_recipe(f"student:{convnext_run}")["init"] == "distilled"


def test_labels_of_unlabelled_encoders_follow_one_rule(tmp_path):
    assert encoder_label("random:resnet18") == "resnet18-rand"
    assert encoder_label("timm:resnet18=/w/r18_in1k.safetensors") == "resnet18-r18_in1k"
    assert encoder_label(EncoderSpec(family="timm", weights="random")) == "resnet50-rand"
    assert encoder_recipe("random:resnet18") == {"init": "random", "student": "resnet18"}
    assert weights_file("random:resnet18") is None


def test_encoder_specs_have_one_checked_constructor():
    assert EncoderSpec.parse("teacher:") == EncoderSpec(family="dinov3")  # an alias
    assert EncoderSpec.parse("random:resnet18@R") == EncoderSpec("timm", "resnet18", "random", "R")
    spec = EncoderSpec.parse({"family": "sam2", "name": "sam2_hiera_tiny", "weights": "w.pt"})
    assert (spec.family, spec.name, spec.weights) == ("sam2", "sam2_hiera_tiny", "w.pt")
    for item, says in [
        ("randm:resnet18", "--encoders randm: unknown encoder family; did you mean random?"),
        ("resnet18", "--encoders resnet18: an encoder spec starts with one of timm:, "),
        ({"family": "timm", "nam": "x"}, "--encoders: nam: unknown key; did you mean name?"),
        ({"family": "sam"}, "--encoders sam: unknown encoder family; did you mean sam2?"),
    ]:
        with pytest.raises(UserError) as err:
            EncoderSpec.parse(item)
        assert str(err.value).startswith(says), str(err.value)
