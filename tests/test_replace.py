"""Prompt-to-prompt control, word-swap editing, subject replacement (Algorithm 3), and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from hifi.algorithms.attention import AttentionStore, controlled_attention
from hifi.algorithms.null_text import NullTextConfig, null_text_sample
from hifi.algorithms.prompt_to_prompt import AttentionMean, AttentionReplace, chain, inject_maps
from hifi.algorithms.replace import edit_image, prompt_to_prompt, replace_subject
from hifi.algorithms.subject import SUBJECT_SLOT, Subject
from hifi.cli import main
from hifi.errors import HifiError
from hifi.io.runs import RunMeta, save_run
from hifi.kernels.ddim import DdimGrid, ddim_timesteps

CAPTION = "a photo of a cat on the beach"
FAST = NullTextConfig(num_steps=4, inner_steps=2)


def square_photo(side: int = 32) -> torch.Tensor:
    """A red-and-green box on a dark background, ``[3, side, side]`` in [-1, 1]."""
    image = torch.full((3, side, side), -0.6)
    image[0, side // 4 : 3 * side // 4, side // 3 : 2 * side // 3] = 0.8
    image[1, side // 4 : 3 * side // 4, side // 3 : 2 * side // 3] = 0.2
    return image


def hifi_subject(tiny, seed: int = 0) -> Subject:
    g = torch.Generator().manual_seed(seed)
    grid = ddim_timesteps(tiny.schedule, FAST.num_steps)
    return Subject(
        class_name="dog", c_s=torch.randn(5, tiny.text_width, generator=g),
        stepwise={t: torch.randn(5, tiny.text_width, generator=g) for t in grid},
    )


# The controller ------------------------------------------------------------------------


def test_inject_maps_takes_the_source_column_of_every_injected_token():
    source, target = torch.rand(2, 3, 5, 6).unbind(0)
    index = torch.tensor([0, 1, -1, 2, 4, 5])
    own = torch.tensor([False, False, False, True, False, False])
    out = inject_maps(source, target, index, own)
    for j, (i, keep) in enumerate(zip(index.tolist(), own.tolist(), strict=True)):
        expected = target[..., j] if keep or i < 0 else source[..., i]
        assert torch.equal(out[..., j], expected)
    with pytest.raises(ValueError, match="one entry per token"):
        inject_maps(source, target, index[:4], own[:4])


def test_attention_replace_changes_only_the_edit_row():
    heads, rows = 2, 4
    probs = torch.rand(rows * heads, 9, 6)
    index, own = torch.arange(6), torch.zeros(6, dtype=torch.bool)
    own[2] = True
    out = AttentionReplace(index, own, source_row=2, target_row=3)("layer", probs, heads).reshape(rows, heads, 9, 6)
    before = probs.reshape(rows, heads, 9, 6)
    assert torch.equal(out[:3], before[:3])
    assert torch.equal(out[3, ..., 2], before[3, ..., 2])
    assert torch.equal(out[3][..., ~own], before[2][..., ~own])


def test_attention_mean_and_chain():
    heads = 2
    mean = AttentionMean(rows=(1,), side=4)
    seen = []
    controller = chain(mean, lambda layer, p, h: seen.append(layer) or p)
    a, b = torch.rand(2 * heads, 16, 3), torch.rand(2 * heads, 4, 3)
    assert controller("x", a, heads) is a and controller("y", b, heads) is b
    assert seen == ["x", "y"]
    maps = mean.maps()
    assert maps.shape == (1, 4, 4, 3)
    expected_first = a.reshape(2, heads, 4, 4, 3)[1].mean(0)
    assert maps.mean() == pytest.approx(((expected_first.mean() + b.reshape(2, heads, 2, 2, 3)[1].mean()) / 2).item())


# Editing on the tiny backend -----------------------------------------------------------


def test_an_unchanged_caption_without_a_subject_returns_the_reconstruction(tiny):
    edit = edit_image(tiny, square_photo(), CAPTION, CAPTION, config=FAST, attention_maps=True)
    assert torch.equal(edit.index, torch.arange(tiny.max_length)) and not edit.own.any()
    torch.testing.assert_close(edit.latents, edit.reconstruction_latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(edit.image, edit.reconstruction, atol=1e-5, rtol=0)
    # The batched reconstruction is the null-text reconstruction.
    torch.testing.assert_close(edit.reconstruction_latents, edit.inversion.reconstruction, atol=1e-3, rtol=1e-4)
    assert edit.attention is not None and edit.attention.shape == (2, 8, 8, tiny.max_length)


def test_injected_maps_equal_the_stored_ones_for_every_non_subject_token(tiny):
    subject = hifi_subject(tiny)
    # "kitten" is not in the tokenizer's word list, so it is several byte-level tokens; "dog"
    # is one: "on the beach" moves k - 1 places left.
    k = len(tiny.tokenizer("kitten", add_special_tokens=False).input_ids)
    assert k >= 2
    edit = replace_subject(tiny, subject, square_photo(), "a photo of a kitten on the beach", "kitten", config=FAST)
    assert edit.edited_caption == "a photo of a dog on the beach"
    assert edit.index[5] == -1 and edit.index[6] == 5 + k
    n = subject.num_tokens
    assert edit.own[5] and edit.own[-n:].all() and edit.own.sum() == n + 1

    # a_t^{r*}: the reconstruction alone, every step and layer recorded.
    inversion = edit.inversion
    stored = AttentionStore()
    with torch.no_grad(), controlled_attention(tiny, stored):
        null_text_sample(
            tiny.denoise, DdimGrid.build(tiny.schedule, inversion.num_steps), inversion.x_T, inversion.cond,
            inversion.phis, guidance=inversion.guidance,
            callback=lambda i, t, x: setattr(stored, "step", i + 1),
        )
    # The maps the edit actually used, after the injection.
    used = AttentionStore()
    conds = subject.conditions(subject.encode(tiny, [f"a photo of a {SUBJECT_SLOT} on the beach"]),
                               ddim_timesteps(tiny.schedule, FAST.num_steps))
    prompt_to_prompt(tiny, inversion, conds, edit.index, edit.own, observer=used,
                     callback=lambda i, t, x: setattr(used, "step", i + 1))

    injected = (edit.index >= 0) & ~edit.own
    assert set(used.maps) == set(stored.maps) == set(range(FAST.num_steps))
    for step, layers in stored.maps.items():
        assert set(used.maps[step]) == set(layers)
        for layer, maps in layers.items():
            a_r = maps[1]  # rows [phi, c^r]: the conditional one
            a_g = used.maps[step][layer][3]  # rows [phi, phi, c^r, c^g]
            torch.testing.assert_close(a_g[:, injected], a_r[:, edit.index[injected]], atol=1e-5, rtol=1e-4)
            # The subject tokens keep maps of their own, also c_s^t's slots, which have a source.
            for j in (edit.own & (edit.index >= 0)).nonzero().flatten().tolist():
                assert not torch.allclose(a_g[:, j], a_r[:, edit.index[j]], atol=1e-3), (step, layer, j)
    torch.testing.assert_close(edit.reconstruction_latents, inversion.reconstruction, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(edit.latents, edit.reconstruction_latents, atol=1e-3)


def test_attention_processors_are_restored_after_an_error(tiny):
    before = tiny.attn_processors
    edit = edit_image(tiny, square_photo(), CAPTION, CAPTION, config=NullTextConfig(num_steps=2, inner_steps=0))

    def fail(layer, probs, heads):
        raise RuntimeError("controller failed")

    with pytest.raises(RuntimeError, match="controller failed"):
        prompt_to_prompt(tiny, edit.inversion, edit.inversion.cond, edit.index, edit.own, observer=fail)
    after = tiny.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_a_missing_source_word_shows_the_caption(tiny):
    with pytest.raises(HifiError, match="'horse' is not in the caption 'a photo of a cat on the beach'"):
        replace_subject(tiny, hifi_subject(tiny), square_photo(), CAPTION, "horse", config=FAST)


# The command line ----------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, tiny):
    subject = hifi_subject(tiny)
    meta = RunMeta(
        backend="tiny", model_id="random:tiny:0", mode="hifi", class_name="dog", caption="a photo of a dog",
        num_tokens=5, text_width=tiny.text_width, max_length=tiny.max_length,
        schedule=tiny.schedule.to_config(), num_steps=FAST.num_steps, sources=(), masks="none",
    )
    save_run(tmp_path / "run", subject, meta)
    return tmp_path / "run"


@pytest.fixture
def photo(tmp_path):
    """A non-square photo: a brown box (the "cat") on grass under a blue sky."""
    img = Image.new("RGB", (48, 40), (60, 160, 70))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 47, 12], fill=(120, 170, 240))
    draw.rectangle([16, 14, 32, 34], fill=(150, 100, 50))
    path = tmp_path / "cat.png"
    img.save(path)
    return path


def fast_flags(out):
    return ["--out", str(out), "--ddim-steps", "3", "--inner-steps", "1", "--quiet"]


def test_hifi_replace_end_to_end(run_dir, photo, tmp_path, capsys):
    out = tmp_path / "out" / "dog.png"
    argv = ["replace", "--run", str(run_dir), "--image", str(photo), "--source-word", "cat",
            "--caption", "a photo of a cat on the grass", "--save-intermediates", *fast_flags(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "48x40" in captured.err and "resized back" in captured.err
    assert str(out) in captured.out
    assert Image.open(out).size == (48, 40)
    assert Image.open(tmp_path / "out" / "dog.reconstruction.png").size == (48, 40)
    assert (tmp_path / "out" / "dog.before-after.png").exists()
    assert Image.open(tmp_path / "out" / "dog.attention.png").size[0] > 6 * 32, "w_g and 5 c_s maps"
    summary = json.loads((tmp_path / "out" / "dog.json").read_text())
    assert summary["edited_caption"] == "a photo of a dog on the grass"
    assert len(summary["null_text_losses"]) == 3 and summary["mode"] == "hifi"


def test_hifi_replace_captions_the_photo_without_caption(run_dir, photo, tmp_path, capsys):
    out = tmp_path / "dog.png"
    argv = ["replace", "--run", str(run_dir), "--image", str(photo), "--source-word", "cat", *fast_flags(out)]
    assert main(argv) == 0
    assert "'a photo of a cat'" in capsys.readouterr().err
    assert out.exists() and not (tmp_path / "dog.json").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--source-word": "horse"}, "'horse' is not in the caption 'a photo of a cat on the grass'"),
        ({"--image": "missing.png"}, "no such image"),
        ({"--image": "broken.png"}, "cannot read"),
        ({"--run": "nowhere"}, "not a finished hifi run"),
    ],
)
def test_hifi_replace_user_errors_are_one_line(run_dir, photo, tmp_path, capsys, change, message):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    flags = {"--run": str(run_dir), "--image": str(photo), "--source-word": "cat",
             "--caption": "a photo of a cat on the grass"}
    flags.update({k: str(tmp_path / v) if k != "--source-word" else v for k, v in change.items()})
    argv = ["replace", *[x for kv in flags.items() for x in kv], *fast_flags(tmp_path / "o.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_bad_null_text_flags_are_one_line_errors(photo, tmp_path, capsys):
    argv = ["edit", "--image", str(photo), "--caption", "a cat", "--source-word", "cat", "--target-word", "dog",
            *fast_flags(tmp_path / "o.png"), "--inner-steps", "-1"]
    assert main(argv) == 2
    assert "inner_steps >= 0" in capsys.readouterr().err


def test_hifi_edit_end_to_end(photo, tmp_path, capsys):
    out = tmp_path / "edit.jpg"
    argv = ["edit", "--image", str(photo), "--caption", "a cat on the grass", "--source-word", "cat",
            "--target-word", "dog", "--backend", "tiny", "--save-intermediates", *fast_flags(out)]
    assert main(argv) == 0
    assert Image.open(out).size == (48, 40)
    summary = json.loads((tmp_path / "edit.json").read_text())
    assert summary["edited_caption"] == "a dog on the grass"
    assert summary["own_token_positions"] == [2], "only the new word keeps its own map"


def test_content_tokens_come_from_the_protocol_and_match_the_tokenizer(tiny):
    from hifi.algorithms.subject import content_tokens

    for prompt in (CAPTION, "a photo of a dog", "", "a cat " * 60):
        expected = tiny.tokenizer(prompt, add_special_tokens=False).input_ids
        found = content_tokens(tiny, prompt)
        # a prompt too long for the encoder is cut where the encoder cuts it (start and end kept)
        assert found == expected[: tiny.max_length - 2], prompt[:20]
    assert len(content_tokens(tiny, "a cat " * 60)) == tiny.max_length - 2
