#!/usr/bin/env python3
"""Deterministic random-weight GGUF fixtures for ferrum's image input (llama.cpp `mtmd` parity).

Default mode writes into tests/data/vision/ (or --out DIR):
  tiny-lm.gguf                 llama arch, d_model 128 (2 heads of 64), 2 blocks, Q8_0 weights, tiny byte-level BPE
  tiny-idefics3-mmproj.gguf    SigLIP + pixel-shuffle projector, laid out as convert_hf_to_gguf.py
                               (conversion/smolvlm.py) writes a SmolVLM/Idefics3 mmproj
  tiny-llava-mmproj.gguf       CLIP + 2-layer MLP, laid out as the legacy
                               tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py writes
                               LLaVA-1.5 mmproj files (the only converter for them)
  img-*.png                    deterministic test images

`--shape smolvlm2-256m --out DIR` writes instead (not committed, ~190 MB):
  smolvlm2-256m-shape-mmproj.gguf   random weights, real SmolVLM2-256M-Video-Instruct vision shapes
  smolvlm2-256m-shape-lm.gguf       tiny random LM with d_model 576 (2 blocks), same tokenizer
  img-512x512.png

Needs numpy, Pillow and the `gguf` package (PYTHONPATH=<llama.cpp>/gguf-py, or `pip install gguf`).
Everything is seeded; rerunning reproduces the files byte for byte with the same numpy/gguf/Pillow
(PNG bytes depend on zlib; pixel values do not).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

try:
    import gguf
except ImportError:  # fall back to a llama.cpp checkout named by LLAMA_CPP_DIR
    sys.path.insert(0, os.path.join(os.environ.get("LLAMA_CPP_DIR", "/tmp/llsrc"), "gguf-py"))
    import gguf

from PIL import Image

F32 = gguf.GGMLQuantizationType.F32
F16 = gguf.GGMLQuantizationType.F16
Q8_0 = gguf.GGMLQuantizationType.Q8_0

# HuggingFaceTB/SmolVLM2-256M-Video-Instruct chat template (chat_template.json), verbatim.
# Note: it expects `content` to be a list of {"type": "text"|"image", ...} parts; a plain string
# content renders as an empty turn body.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# each merge builds on tokens that already exist; "Ċ Ċ" gives the single "\n\n" token that
# mtmd's idefics3 template looks up with lookup_token("\n\n")
MERGES = [
    "Ġ t", "h e", "Ġt he", "Ċ Ċ", "i n", "e r", "Ġ a", "i s", "o n", "a n", "r e", "a t", "e n",
    "Ġ s", "Ġ w", "Ġ o", "Ġ c", "o r", "e s", "e d", "Ġ b", "Ġ f", "Ġ m", "Ġ d", "Ġ p", "a r",
    "i t", "a l", "o u", "Ġ i", "Ġi m", "a g", "ag e", "Ġim age", "s s", "U s", "Us er", "A ss",
    "is t", "an t", "Ass ist", "Assist ant", "D es", "c r", "i b", "cr ib", "Des crib", "Describ e",
    "Ġ h", "Ġw h", "Ġwh at", "Ġ Ġ", "o l", "Ġc ol", "Ġcol or", "Ġs h", "a p", "Ġsh ap", "Ġshap e",
    "Ġt w", "Ġtw o", "Ġ C", "Ġ T", "Ċ Ġ",
]

SPECIAL_HEAD = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TAIL = ["<fake_token_around_image>", "<global-img>", "<image>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]


def build_vocab():
    b2u = bytes_to_unicode()
    tokens: list[str] = list(SPECIAL_HEAD)
    types: list[int] = [gguf.TokenType.CONTROL] * len(SPECIAL_HEAD)
    for b in range(256):
        tokens.append(b2u[b])
        types.append(gguf.TokenType.NORMAL)
    seen = set(tokens)
    for m in MERGES:
        a, b = m.split(" ")
        assert a in seen and b in seen, m
        t = a + b
        assert t not in seen, m
        tokens.append(t)
        types.append(gguf.TokenType.NORMAL)
        seen.add(t)
    for t in SPECIAL_TAIL:
        tokens.append(t)
        types.append(gguf.TokenType.CONTROL)
    return tokens, types


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def lin(rng, n_out, n_in, gain=1.0):
    """torch nn.Linear-shaped [out, in] weight (ggml ne = [in, out])"""
    return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)


def vec(rng, n, std, mean=0.0):
    return (mean + rng.standard_normal(n) * std).astype(np.float32)


def add(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype):
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == F32:
        w.add_tensor(name, data)
    elif qtype == F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_dtype=qtype)


# --------------------------------------------------------------------------------------------
# language model
# --------------------------------------------------------------------------------------------

def write_lm(path, seed, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx=2048, name="tiny-lm"):
    rng = np.random.default_rng(seed)
    tokens, types = build_vocab()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(n_vocab)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    eot = tokens.index("<|endoftext|>")
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)
    w.add_chat_template(SMOLVLM_CHAT_TEMPLATE)

    special = np.array([t == gguf.TokenType.CONTROL for t in types])

    add(w, "token_embd.weight", rng.standard_normal((n_vocab, n_embd)).astype(np.float32) * 0.5, Q8_0)
    for il in range(n_layer):
        p = f"blk.{il}."
        add(w, p + "attn_norm.weight", vec(rng, n_embd, 0.1, 1.0), F32)
        add(w, p + "attn_q.weight", lin(rng, n_head * head_dim, n_embd, 1.5), Q8_0)
        add(w, p + "attn_k.weight", lin(rng, n_head_kv * head_dim, n_embd, 1.5), Q8_0)
        add(w, p + "attn_v.weight", lin(rng, n_head_kv * head_dim, n_embd), Q8_0)
        add(w, p + "attn_output.weight", lin(rng, n_embd, n_head * head_dim), Q8_0)
        add(w, p + "ffn_norm.weight", vec(rng, n_embd, 0.1, 1.0), F32)
        add(w, p + "ffn_gate.weight", lin(rng, n_ff, n_embd), Q8_0)
        add(w, p + "ffn_up.weight", lin(rng, n_ff, n_embd), Q8_0)
        add(w, p + "ffn_down.weight", lin(rng, n_embd, n_ff), Q8_0)
    add(w, "output_norm.weight", vec(rng, n_embd, 0.1, 1.0), F32)
    out = rng.standard_normal((n_vocab, n_embd)).astype(np.float32) * 0.5
    out[special] *= 0.02  # keep control tokens (EOG among them) out of greedy picks
    add(w, "output.weight", out, Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------------------------
# mmproj: Idefics3 / SmolVLM (conversion/smolvlm.py + MmprojModel conventions)
#   - tensors whose HF name contains ".embeddings." (patch_embd.{weight,bias}, position_embd) are F32
#   - other 2-D+ weights F16 (ftype MOSTLY_F16), 1-D tensors F32
# --------------------------------------------------------------------------------------------

def write_idefics3_mmproj(path, seed, image_size=64, patch_size=8, n_embd=64, n_ff=128, n_layer=2, n_head=4,
                          eps=1e-6, scale_factor=2, proj_dim=64, longest_edge=128, name="tiny-idefics3"):
    rng = np.random.default_rng(seed)
    n_pos = (image_size // patch_size) ** 2

    w = gguf.GGUFWriter(path, "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(proj_dim)
    w.add_vision_image_size(image_size)
    w.add_vision_patch_size(patch_size)
    w.add_vision_embedding_length(n_embd)
    w.add_vision_feed_forward_length(n_ff)
    w.add_vision_block_count(n_layer)
    w.add_vision_head_count(n_head)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    w.add_vision_attention_layernorm_eps(eps)
    w.add_vision_projector_scale_factor(scale_factor)
    w.add_vision_use_gelu(True)
    w.add_vision_preproc_image_size(longest_edge)

    fan_in = 3 * patch_size * patch_size
    add(w, "v.patch_embd.weight",
        (rng.standard_normal((n_embd, 3, patch_size, patch_size)) / np.sqrt(fan_in)).astype(np.float32), F32)
    add(w, "v.patch_embd.bias", vec(rng, n_embd, 0.1), F32)
    add(w, "v.position_embd.weight", rng.standard_normal((n_pos, n_embd)).astype(np.float32) * 0.3, F32)
    for il in range(n_layer):
        p = f"v.blk.{il}."
        add(w, p + "attn_k.weight", lin(rng, n_embd, n_embd, 1.5), F16)
        add(w, p + "attn_k.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "attn_v.weight", lin(rng, n_embd, n_embd), F16)
        add(w, p + "attn_v.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "attn_q.weight", lin(rng, n_embd, n_embd, 1.5), F16)
        add(w, p + "attn_q.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "attn_out.weight", lin(rng, n_embd, n_embd), F16)
        add(w, p + "attn_out.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "ln1.weight", vec(rng, n_embd, 0.1, 1.0), F32)
        add(w, p + "ln1.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "ffn_up.weight", lin(rng, n_ff, n_embd), F16)       # mlp.fc1, torch [n_ff, n_embd]
        add(w, p + "ffn_up.bias", vec(rng, n_ff, 0.1), F32)
        add(w, p + "ffn_down.weight", lin(rng, n_embd, n_ff), F16)     # mlp.fc2, torch [n_embd, n_ff]
        add(w, p + "ffn_down.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "ln2.weight", vec(rng, n_embd, 0.1, 1.0), F32)
        add(w, p + "ln2.bias", vec(rng, n_embd, 0.1), F32)
    add(w, "v.post_ln.weight", vec(rng, n_embd, 0.1, 1.0), F32)
    add(w, "v.post_ln.bias", vec(rng, n_embd, 0.1), F32)
    k = n_embd * scale_factor * scale_factor
    add(w, "mm.model.fc.weight", lin(rng, proj_dim, k), F16)  # connector.modality_projection.proj, no bias

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------------------------
# mmproj: LLaVA-1.5 (legacy convert_image_encoder_to_gguf.py conventions)
#   - 4-D patch_embd F16, every 2-D ".weight" F16 (position_embd too), 1-D F32
#   - HF mlp.fc1 is written as "ffn_down" and mlp.fc2 as "ffn_up" (legacy name swap; clip.cpp
#     detects ffn_down->ne[0] == n_embd and swaps them back)
#   - CLIP: class embedding, pre-layernorm, no patch bias; post_layernorm dropped with a llava projector
# --------------------------------------------------------------------------------------------

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_llava_mmproj(path, seed, image_size=32, patch_size=8, n_embd=64, n_ff=128, n_layer=3, n_head=4,
                       eps=1e-5, proj_hidden=128, proj_dim=64, name="tiny-llava"):
    rng = np.random.default_rng(seed)
    n_pos = (image_size // patch_size) ** 2 + 1

    w = gguf.GGUFWriter(path, "clip")
    w.add_name(name)
    w.add_description("image encoder for LLaVA")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(1)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.projection_dim", proj_dim)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_array("clip.vision.image_mean", CLIP_MEAN)
    w.add_array("clip.vision.image_std", CLIP_STD)
    w.add_bool("clip.use_gelu", False)  # CLIP hidden_act quick_gelu -> gelu_quick

    add(w, "mm.0.weight", lin(rng, proj_hidden, n_embd), F16)
    add(w, "mm.0.bias", vec(rng, proj_hidden, 0.1), F32)
    add(w, "mm.2.weight", lin(rng, proj_dim, proj_hidden), F16)
    add(w, "mm.2.bias", vec(rng, proj_dim, 0.1), F32)

    fan_in = 3 * patch_size * patch_size
    add(w, "v.class_embd", vec(rng, n_embd, 0.5), F32)
    add(w, "v.patch_embd.weight",
        (rng.standard_normal((n_embd, 3, patch_size, patch_size)) * 2.0 / np.sqrt(fan_in)).astype(np.float32), F16)
    add(w, "v.position_embd.weight", rng.standard_normal((n_pos, n_embd)).astype(np.float32) * 0.3, F16)
    add(w, "v.pre_ln.weight", vec(rng, n_embd, 0.1, 1.0), F32)
    add(w, "v.pre_ln.bias", vec(rng, n_embd, 0.1), F32)
    for il in range(n_layer):
        p = f"v.blk.{il}."
        add(w, p + "attn_k.weight", lin(rng, n_embd, n_embd, 1.5), F16)
        add(w, p + "attn_k.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "attn_v.weight", lin(rng, n_embd, n_embd), F16)
        add(w, p + "attn_v.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "attn_q.weight", lin(rng, n_embd, n_embd, 1.5), F16)
        add(w, p + "attn_q.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "attn_out.weight", lin(rng, n_embd, n_embd), F16)
        add(w, p + "attn_out.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "ln1.weight", vec(rng, n_embd, 0.1, 1.0), F32)
        add(w, p + "ln1.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "ffn_down.weight", lin(rng, n_ff, n_embd), F16)     # HF mlp.fc1 (legacy name)
        add(w, p + "ffn_down.bias", vec(rng, n_ff, 0.1), F32)
        add(w, p + "ffn_up.weight", lin(rng, n_embd, n_ff), F16)       # HF mlp.fc2 (legacy name)
        add(w, p + "ffn_up.bias", vec(rng, n_embd, 0.1), F32)
        add(w, p + "ln2.weight", vec(rng, n_embd, 0.1, 1.0), F32)
        add(w, p + "ln2.bias", vec(rng, n_embd, 0.1), F32)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

def make_image(seed, w, h, rgba=False):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    r = 255 * u
    g = 255 * v
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (u * 1.5 + v * 0.7))
    img = np.stack([r, g, b], axis=-1)
    img += rng.normal(0, 6, img.shape)
    # shapes: a disc, a rectangle, a diagonal stripe
    cx, cy, rad = w * 0.3, h * 0.6, 0.22 * min(w, h)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < rad ** 2
    img[disc] = [230, 40, 30]
    x0, x1, y0, y1 = int(w * 0.55), int(w * 0.85), int(h * 0.15), int(h * 0.45)
    img[y0:y1 + 1, x0:x1 + 1] = [20, 60, 220]
    stripe = np.abs((x / w) - (y / h)) < 0.04
    img[stripe] = [250, 250, 250]
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if not rgba:
        return Image.fromarray(img, "RGB")
    # alpha: horizontal ramp 0..255, fully transparent left quarter, opaque disc
    a = np.clip(np.rint(255 * (u - 0.25) / 0.75), 0, 255).astype(np.uint8)
    a[disc] = 255
    return Image.fromarray(np.dstack([img, a]), "RGBA")


IMAGES = {
    "img-64x64.png": (101, 64, 64, False),
    "img-100x37.png": (102, 100, 37, False),
    "img-30x90.png": (103, 30, 90, False),
    "img-200x150.png": (104, 200, 150, False),
    "img-rgba-50x50.png": (105, 50, 50, True),
}


def save_png(img: Image.Image, path):
    img.save(path, format="PNG", optimize=False, compress_level=9)


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output directory (default: tests/data/vision, or required with --shape)")
    ap.add_argument("--shape", choices=["tiny", "smolvlm2-256m"], default="tiny")
    args = ap.parse_args()

    if args.shape == "tiny":
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = args.out or os.path.join(root, "tests", "data", "vision")
        os.makedirs(out, exist_ok=True)
        # Head size 64, as every real model's: ferrum's attention kernels take 64-wide heads.
        write_lm(os.path.join(out, "tiny-lm.gguf"), seed=1, n_embd=128, n_head=2, n_head_kv=1, n_ff=256)
        write_idefics3_mmproj(os.path.join(out, "tiny-idefics3-mmproj.gguf"), seed=2, proj_dim=128)
        write_llava_mmproj(os.path.join(out, "tiny-llava-mmproj.gguf"), seed=3, proj_dim=128)
        for fname, (seed, w, h, rgba) in IMAGES.items():
            save_png(make_image(seed, w, h, rgba), os.path.join(out, fname))
    else:
        if not args.out:
            ap.error("--shape smolvlm2-256m needs --out DIR (these files are not committed)")
        out = args.out
        os.makedirs(out, exist_ok=True)
        # SmolVLM2-256M-Video-Instruct: SigLIP-B/16 @512 (12 blocks, 12 heads, 768, ffn 3072, eps 1e-6),
        # pixel shuffle x4 -> 64 tokens per 512x512 tile, text hidden 576 (SmolLM2-135M),
        # preprocessor size.longest_edge 2048 (4x4 tiles of 512 + overview)
        write_idefics3_mmproj(os.path.join(out, "smolvlm2-256m-shape-mmproj.gguf"), seed=12,
                              image_size=512, patch_size=16, n_embd=768, n_ff=3072, n_layer=12, n_head=12,
                              eps=1e-6, scale_factor=4, proj_dim=576, longest_edge=2048,
                              name="smolvlm2-256m-shape")
        write_lm(os.path.join(out, "smolvlm2-256m-shape-lm.gguf"), seed=11, n_embd=576, n_layer=2, n_head=9,
                 n_head_kv=3, n_ff=1536, n_ctx=8192, name="smolvlm2-256m-shape-lm")
        save_png(make_image(106, 512, 512), os.path.join(out, "img-512x512.png"))
    print(f"wrote fixtures to {out}")


if __name__ == "__main__":
    main()
