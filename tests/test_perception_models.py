"""Perception models with weights (SAM, Grounding DINO, DINO, CLIP, BLIP-2, BLIP), on random tiny weights.

Every model is built from a tiny config here (``model="random:tiny"``), tokenizers too;
nothing touches the network (the hub is off for every test of this module).
"""

from __future__ import annotations

import ast
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from hifi.errors import HifiError, ModelNotFoundError
from hifi.kernels.similarity import cosine_similarity_matrix
from hifi.perception import Captioner, FolderSegmenter, ImageEmbedder, Segmenter
from hifi.perception.masks import auto_masks
from hifi.perception.registry import (
    available_perception,
    configured_perception,
    load_captioner,
    load_embedder,
    load_segmenter,
)
from hifi_backends.perception.blip import names_class
from hifi_backends.perception.grounding_dino import boxes_to_pixels, detection_query
from hifi_backends.perception.loading import read_pixel_config
from hifi_backends.perception.pixels import CLIP_MEAN, CLIP_STD, PixelConfig, masks_from_low_res, to_model_pixels

TINY = "random:tiny"
ENV_VARS = ("HIFI_SAM_MODEL", "HIFI_SAM_CHECKPOINT", "HIFI_GROUNDING_DINO_MODEL", "HIFI_DINO_MODEL",
            "HIFI_CLIP_MODEL", "HIFI_BLIP2_MODEL", "HIFI_BLIP_MODEL")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub, and no perception model configured from the caller's environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _images(b: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# Registry --------------------------------------------------------------------------------


def test_every_name_is_registered():
    found = available_perception()
    assert {"attention", "folder", "grounded-sam", "sam"} <= set(found["segmenters"])
    assert {"vae-latent", "dino", "clip"} <= set(found["embedders"])
    assert {"template", "blip2", "blip"} <= set(found["captioners"])


@pytest.mark.parametrize("load, kind", [(load_segmenter, "segmenters"), (load_embedder, "embedders"),
                                        (load_captioner, "captioners")])
def test_an_unknown_name_lists_the_known_ones(load, kind):
    with pytest.raises(HifiError, match=rf"unknown .* 'nope'; known {kind}: .*,"):
        load("nope")


def test_weight_free_models_refuse_weights_and_need_their_backend():
    with pytest.raises(HifiError, match="drop model"):
        load_segmenter("attention", model="/x")
    with pytest.raises(HifiError, match="backend="):
        load_embedder("vae-latent")
    assert load_captioner("template", device="cpu").caption(_images(), "dog") == ["a photo of a dog"] * 2


# Embedders -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino():
    return load_embedder("dino", model=TINY, device="cpu")


@pytest.fixture(scope="module")
def clip():
    return load_embedder("clip", model=TINY, device="cpu")


@pytest.mark.parametrize("name", ["dino", "clip"])
def test_embedders_take_any_size_and_batch(name, request):
    embedder = request.getfixturevalue(name)
    assert isinstance(embedder, ImageEmbedder) and embedder.name == name
    a = embedder.embed(_images(3, 40, 48))
    b = embedder.embed(_images(1, 64, 64))
    assert a.dtype == torch.float32 and a.shape[0] == 3 and a.shape[1] == b.shape[1]
    assert torch.isfinite(a).all()
    # one image alone embeds as it does in a batch
    torch.testing.assert_close(embedder.embed(_images(3, 40, 48)[1:2])[0], a[1], atol=1e-5, rtol=1e-4)


def test_clip_text_features_share_the_image_space(clip):
    text = clip.embed_text(["a photo of a dog", "a red box on the beach at night"])
    image = clip.embed(_images())
    assert text.shape == (2, image.shape[1]) and text.dtype == torch.float32
    assert cosine_similarity_matrix(image, text).shape == (2, 2)


def test_dino_is_the_cls_token_of_the_vit(dino):
    pixels = to_model_pixels(_images(), dino.pixels)
    with torch.no_grad():
        expected = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.embed(_images()), expected)


def test_pixels_match_the_transformers_processors():
    """The tensor preprocessing equals CLIPImageProcessor's and ViTImageProcessor's (no resize needed)."""
    from transformers import CLIPImageProcessor, ViTImageProcessor

    images = _images(2, 224, 224)
    arrays = [((x + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8).numpy() for x in images]
    unit_images = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])
    clip_ref = CLIPImageProcessor()(images=arrays, return_tensors="pt").pixel_values
    ours = to_model_pixels(unit_images, PixelConfig(resize=224, mean=CLIP_MEAN, std=CLIP_STD, crop=224))
    torch.testing.assert_close(ours, clip_ref, atol=1e-4, rtol=1e-4)
    vit_ref = ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])(
        images=arrays, return_tensors="pt").pixel_values
    ours = to_model_pixels(unit_images, PixelConfig(resize=224, mean=(0.485, 0.456, 0.406),
                                                    std=(0.229, 0.224, 0.225)))
    torch.testing.assert_close(ours, vit_ref, atol=1e-4, rtol=1e-4)


def test_a_saved_processor_sets_the_pixels(tmp_path):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 96},
                       crop_size={"height": 80, "width": 80}).save_pretrained(tmp_path)
    config = read_pixel_config(str(tmp_path), PixelConfig(resize=224, mean=CLIP_MEAN, std=CLIP_STD))
    assert (config.resize, config.crop, config.mean, config.std) == (96, 80, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert to_model_pixels(_images(1, 50, 70), config).shape == (1, 3, 80, 80)


def test_dino_loads_from_a_folder_and_from_a_checkpoint_file(dino, tmp_path, monkeypatch):
    dino.model.save_pretrained(tmp_path)
    expected = dino.embed(_images())
    from_folder = load_embedder("dino", model=str(tmp_path), device="cpu")
    torch.testing.assert_close(from_folder.embed(_images()), expected)
    checkpoint = next(tmp_path.glob("*.safetensors"))
    monkeypatch.setenv("HIFI_DINO_MODEL", str(checkpoint))  # the variable is read when no model is given
    from_file = load_embedder("dino", device="cpu")
    torch.testing.assert_close(from_file.embed(_images()), expected)


# Missing models: one line naming what to set ---------------------------------------------


@pytest.mark.parametrize("load, name, env", [
    (load_embedder, "dino", "HIFI_DINO_MODEL"),
    (load_embedder, "clip", "HIFI_CLIP_MODEL"),
    (load_segmenter, "grounded-sam", "HIFI_SAM_MODEL"),
    (load_captioner, "blip2", "HIFI_BLIP2_MODEL"),
    (load_captioner, "blip", "HIFI_BLIP_MODEL"),
])
@pytest.mark.parametrize("where", ["hifi-test/no-such-model", "/no/such/folder", None])
def test_a_missing_model_is_one_line_naming_its_variable(load, name, env, where, monkeypatch):
    if where is not None:
        monkeypatch.setenv(env, where)
    with pytest.raises(ModelNotFoundError) as err:
        load(name, device="cpu")
    message = str(err.value)
    assert "\n" not in message and env in message
    if where is not None:
        assert repr(where) in message


def test_missing_segmentation_models_name_their_variables(monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no SAM checkpoint .* configured: set HIFI_SAM_CHECKPOINT"):
        load_segmenter("sam", device="cpu")
    with pytest.raises(ModelNotFoundError, match="HIFI_GROUNDING_DINO_MODEL") as err:
        load_segmenter("grounded-sam", model=TINY, detector_model="hifi-test/no-such-detector", device="cpu")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HIFI_SAM_CHECKPOINT", "/no/such/sam_vit_b.pth")
    pytest.importorskip("segment_anything")
    with pytest.raises(ModelNotFoundError, match="HIFI_SAM_CHECKPOINT"):
        load_segmenter("sam", detector_model=TINY, device="cpu")


# Segmenters ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grounded_sam():
    return load_segmenter("grounded-sam", model=TINY, device="cpu", box_threshold=0.0)


def test_grounded_sam_gives_a_bool_mask_per_image(grounded_sam):
    assert isinstance(grounded_sam, Segmenter) and not grounded_sam.wants_attention
    masks = grounded_sam.segment(_images(2, 40, 48), "dog")
    assert masks.shape == (2, 40, 48) and masks.dtype == torch.bool
    found = grounded_sam.detections(_images(2, 40, 48), "dog")
    assert all(d.boxes.shape == (1, 4) for d in found)


def test_grounded_sam_finds_nothing_above_an_impossible_threshold():
    strict = load_segmenter("grounded-sam", model=TINY, device="cpu", box_threshold=1.0)
    assert not strict.segment(_images(2, 40, 48), "dog").any()


def test_grounding_dino_boxes_are_best_first_and_inside_the_image(grounded_sam):
    found = grounded_sam.detector.detect(_images(2, 40, 48), "Dog")
    for d in found:
        assert d.boxes.shape[0] == d.scores.shape[0] == 10
        assert (d.scores[:-1] >= d.scores[1:]).all()
        assert (d.boxes[:, 0::2] <= 48).all() and (d.boxes[:, 1::2] <= 40).all() and (d.boxes >= 0).all()


def test_box_conversion_and_query_format():
    box = boxes_to_pixels(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), (100, 200))
    torch.testing.assert_close(box, torch.tensor([[50.0, 25.0, 150.0, 75.0]]))
    assert detection_query(" Teddy Bear ") == "teddy bear." and detection_query("dog.") == "dog."
    with pytest.raises(HifiError):
        detection_query("  ")


def test_sam_mask_upsampling_matches_the_sam_processor():
    """masks_from_low_res equals SamImageProcessor.post_process_masks (upsample, crop the padding, resize)."""
    from transformers import SamImageProcessor

    low_res = torch.randn(3, 16, 16)
    ours = masks_from_low_res(low_res, 64, (48, 64), (60, 80))
    ref = SamImageProcessor().post_process_masks(low_res[None, :, None], [(60, 80)], [(48, 64)],
                                                 pad_size={"height": 64, "width": 64})[0][:, 0]
    assert torch.equal(ours, ref)


def test_segment_anything_path_equals_its_predictor():
    """The batched segment-anything path agrees with SamPredictor.predict_torch, image by image."""
    pytest.importorskip("segment_anything")
    from segment_anything import SamPredictor

    from hifi_backends.perception.sam import SegmentAnythingSam, load_segment_anything

    sam = load_segment_anything(TINY, torch.device("cpu"))
    assert isinstance(sam, SegmentAnythingSam)
    images = _images(2, 40, 56)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 36.0]]), torch.tensor([[10.0, 2.0, 50.0, 20.0], [0, 0, 56, 40]])]
    ours = sam.segment_boxes(images, boxes)
    predictor = SamPredictor(sam.model)
    for image, box, mine in zip(images, boxes, ours, strict=True):
        # ResizeLongestSide.apply_image_torch reads the size from the wrong dimensions (it takes B, C for H, W):
        # resize as its docstring says, with the shape its get_preprocess_shape gives
        shape = predictor.transform.get_preprocess_shape(40, 56, predictor.transform.target_length)
        pixels = torch.nn.functional.interpolate(((image + 1) * 127.5)[None], shape, mode="bilinear",
                                                 align_corners=False, antialias=True)
        predictor.set_torch_image(pixels, (40, 56))
        ref, _, _ = predictor.predict_torch(None, None, boxes=predictor.transform.apply_boxes_torch(box, (40, 56)),
                                            multimask_output=False)
        assert mine.shape == ref[:, 0].shape
        assert (mine == ref[:, 0]).float().mean() > 0.999


def test_sam_segmenter_uses_segment_anything():
    pytest.importorskip("segment_anything")
    segmenter = load_segmenter("sam", model=TINY, device="cpu", box_threshold=0.0)
    assert segmenter.name == "sam"
    masks = segmenter.segment(_images(2, 40, 48), "dog")
    assert masks.shape == (2, 40, 48) and masks.dtype == torch.bool


def test_folder_segmenter_reads_masks_by_name(tmp_path):
    for name, value in (("a", 255), ("b", 0)):
        Image.new("L", (32, 32), value).save(tmp_path / f"{name}.png")
    masks = load_segmenter("folder", folder=str(tmp_path), names=["b", "a"]).segment(_images(2, 16, 16), "dog")
    assert masks.shape == (2, 16, 16) and not masks[0].any() and masks[1].all()
    assert isinstance(FolderSegmenter(tmp_path), Segmenter)
    with pytest.raises(HifiError, match="no mask for c"):
        FolderSegmenter(tmp_path, ("c",)).segment(_images(1), "dog")
    with pytest.raises(HifiError, match="2 masks .* for 3 images"):
        FolderSegmenter(tmp_path).segment(_images(3), "dog")


# groundingdino-py on transformers 5 --------------------------------------------------------


@pytest.fixture(scope="module")
def groundingdino_py(tmp_path_factory):
    """groundingdino-py's own model (Swin-T backbone, tiny transformer) with a tiny BERT from a local folder."""
    pytest.importorskip("groundingdino")
    from transformers import BertConfig, BertModel

    from hifi_backends.perception.groundingdino_compat import build_groundingdino_py, groundingdino_config
    from hifi_backends.perception.tiny import build_bert_tokenizer

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = build_bert_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    # hidden_dim stays 256: the package hard-codes it in its text position embedding
    config = groundingdino_config(hidden_dim=256, nheads=8, num_queries=6, enc_layers=1, dec_layers=1,
                                  dim_feedforward=32, enc_n_points=1, dec_n_points=1, text_encoder_type=str(folder))
    torch.manual_seed(0)
    return build_groundingdino_py(config).eval(), config


def test_groundingdino_py_detects_through_the_compat_layer(groundingdino_py):
    from groundingdino.models.GroundingDINO import groundingdino as module

    from hifi_backends.perception.groundingdino_compat import BertEncoderAdapter, GroundingDinoPy

    model, _ = groundingdino_py
    assert isinstance(model.bert, BertEncoderAdapter)
    assert module.BertModelWarper is not BertEncoderAdapter, "the package is left as it was"
    found = GroundingDinoPy(model, box_threshold=0.0, side=64, max_side=64).detect(_images(2, 40, 48), "dog")
    assert [d.boxes.shape for d in found] == [(6, 4), (6, 4)]
    assert all(torch.isfinite(d.boxes).all() and (d.scores[:-1] >= d.scores[1:]).all() for d in found)


def test_groundingdino_py_checkpoint_round_trip(groundingdino_py):
    from hifi_backends.perception.groundingdino_compat import build_groundingdino_py

    model, config = groundingdino_py
    config.device = "cpu"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as the released .pth files hold them
    reloaded = build_groundingdino_py(config, state).eval()
    images = _images(1, 64, 64)
    with torch.no_grad():
        a = model(images, captions=["dog."])
        b = reloaded(images, captions=["dog."])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


def test_bert_adapter_equals_bert_model():
    """The adapter's encoder pass is BertModel's own for a [B, L] mask, and a [B, L, L] mask isolates phrases."""
    from transformers import BertConfig, BertModel

    from hifi_backends.perception.groundingdino_compat import BertEncoderAdapter

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32)).eval()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    adapter = BertEncoderAdapter(bert)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = adapter(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1, :5], ref[1, :5], atol=1e-5, rtol=1e-5)
        blocks = torch.zeros(1, 7, 7)
        blocks[:, :3, :3] = 1
        blocks[:, 3:, 3:] = 1
        changed = ids[:1].clone()
        changed[0, 5] = (changed[0, 5] % 49) + 1
        first = adapter(input_ids=ids[:1], attention_mask=blocks)["last_hidden_state"]
        second = adapter(input_ids=changed, attention_mask=blocks)["last_hidden_state"]
    torch.testing.assert_close(first[0, :3], second[0, :3])
    assert not torch.allclose(first[0, 3:], second[0, 3:])


# Captioners ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["blip2", "blip"])
def test_captioners_name_the_class(name):
    captioner = load_captioner(name, model=TINY, device="cpu", max_new_tokens=4)
    assert isinstance(captioner, Captioner) and captioner.name == name
    captions = captioner.caption(_images(2, 40, 48), "dog")
    assert len(captions) == 2 and all(isinstance(c, str) and names_class(c, "dog") for c in captions)


def test_names_class_matches_whole_words():
    assert names_class("A Dog on the grass", "dog") and names_class("two dogs", "dog")
    assert names_class("a teddy bear", "teddy bear") and not names_class("a hotdog stand", "dog")


# Cosine helper ---------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(hnp.arrays("float32", st.tuples(st.integers(1, 4), st.just(5)), elements=st.floats(-10, 10, width=32)),
       hnp.arrays("float32", st.tuples(st.integers(1, 4), st.just(5)), elements=st.floats(-10, 10, width=32)),
       st.floats(0.1, 10))
def test_cosine_matrix_is_pairwise_cosine_and_scale_free(a, b, scale):
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    a[:, 0] += 11.0  # no zero rows
    b[:, 0] += 11.0
    got = cosine_similarity_matrix(a, b)
    naive = torch.tensor([[float(torch.nn.functional.cosine_similarity(x, y, dim=0)) for y in b] for x in a])
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cosine_similarity_matrix(a * scale, b), got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cosine_similarity_matrix(a, a).diagonal(), torch.ones(a.shape[0]), atol=1e-5, rtol=0)


def test_cosine_matrix_checks_shapes():
    with pytest.raises(HifiError, match="cosine"):
        cosine_similarity_matrix(torch.ones(2, 3), torch.ones(2, 4))


# Wiring ----------------------------------------------------------------------------------


def test_auto_masks_needs_grounded_sam_configured(monkeypatch):
    with pytest.raises(HifiError, match="HIFI_GROUNDING_DINO_MODEL.*HIFI_SAM_MODEL"):
        auto_masks(_images(), "dog")
    with pytest.raises(HifiError, match="attention"):
        auto_masks(_images(), "dog", "attention")
    monkeypatch.setenv("HIFI_GROUNDING_DINO_MODEL", TINY)
    monkeypatch.setenv("HIFI_SAM_MODEL", TINY)
    masks = auto_masks(_images(3, 40, 40), "dog", box_threshold=0.0)
    assert masks.shape == (3, 40, 40) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_configured_perception_falls_back_to_weight_free(tiny, monkeypatch):
    assert configured_perception(tiny).describe() == {"segmenter": "attention", "embedder": "vae-latent",
                                                      "captioner": "template"}
    monkeypatch.setenv("HIFI_DINO_MODEL", TINY)
    monkeypatch.setenv("HIFI_BLIP_MODEL", TINY)
    monkeypatch.setenv("HIFI_GROUNDING_DINO_MODEL", TINY)
    monkeypatch.setenv("HIFI_SAM_MODEL", TINY)
    assert configured_perception(tiny, captioner="template").describe() == {
        "segmenter": "grounded-sam", "embedder": "dino", "captioner": "template"}


def test_a_backend_declaring_perception_preferences_gets_its_models_first(tiny, monkeypatch):
    """A backend's PerceptionPreferences come before the environment's; the toy factory declares ToyWorld's."""
    from hifi.protocols import PerceptionPreferences
    from hifi.registry import backend_perception_defaults
    from hifi_backends.toy.backend import PERCEPTION, build_toy_backend

    monkeypatch.setenv("HIFI_DINO_MODEL", TINY)
    assert isinstance(tiny, PerceptionPreferences) and not tiny.perception_defaults
    assert configured_perception(tiny).embedder.name == "dino"
    monkeypatch.setattr(tiny, "perception_defaults", {"embedder": "vae-latent"})
    assert configured_perception(tiny).embedder.name == "vae-latent"
    assert isinstance(build_toy_backend, PerceptionPreferences)
    assert backend_perception_defaults("toy") == dict(PERCEPTION) == {"segmenter": "toy-seg", "embedder": "toy-id",
                                                                      "clip": "toyclip"}
    assert backend_perception_defaults("tiny") == {}


@pytest.mark.parametrize("module", ["hifi.perception", "hifi.perception.builtin", "hifi.perception.registry",
                                    "hifi.perception.masks", "hifi.perception.models", "hifi.perception.doctor"])
def test_the_core_never_imports_the_backends(module):
    """hifi.perception finds the models through entry points, never by import."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.startswith("hifi_backends")]
