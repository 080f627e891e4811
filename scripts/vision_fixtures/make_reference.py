#!/usr/bin/env python3
"""Run llama.cpp (mtmd_ref + llama-mtmd-cli) over the vision fixtures and write the reference outputs.

    scripts/vision_fixtures/make_reference.py [--data tests/data/vision] [--bin DIR]

Writes into the data dir:
  reference.json          flash attention as llama-mtmd-cli defaults it (AUTO: enabled on CPU, clip and LM);
                          each case also records how far the flash-attention-off run is from it
  reference_fa_off.json   (only with --with-fa-off) the same cases with flash attention disabled, no rgb_b64
Embedding values and logits are written with 7 significant digits (the llama.cpp-vs-anything noise
floor is ~1e-3). A tile's rgb_b64 is written only the first time that exact tile appears (by
rgb_fnv1a64, which every image chunk carries).

Needs: mtmd_ref (build_ref.sh) and llama-mtmd-cli in --bin (default $LLAMA_CPP_BUILD/bin or /tmp/llsrc/build/bin),
numpy and Pillow. LLAMA_CPP_COMMIT names the llama.cpp commit recorded in the output.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

COMMIT = os.environ.get("LLAMA_CPP_COMMIT", "0c1e57098")

P_IDEFICS = "<|im_start|>User:<__media__>Describe the image.<end_of_utterance>\nAssistant:"
# what llama.cpp's jinja renders from the model's own (SmolVLM2) template for
# messages=[{"role":"user","content":"<__media__>Describe the image."}], add_generation_prompt=true
P_IDEFICS_CHAT = "<|im_start|>User: <__media__>Describe the image.<end_of_utterance>\nAssistant:"
P_TWO = ("<|im_start|>User: Image one<__media__>\nImage two<__media__>\nWhat is the color of the two shapes?"
         "<end_of_utterance>\nAssistant:")
P_LLAVA = "USER: <__media__>\nWhat is in the image? ASSISTANT:"

LM = "tiny-lm.gguf"
IDE = "tiny-idefics3-mmproj.gguf"
LLAVA = "tiny-llava-mmproj.gguf"

CASES = [
    dict(name="idefics3-64x64", mmproj=IDE, prompt=P_IDEFICS, images=["img-64x64.png"]),
    dict(name="idefics3-100x37", mmproj=IDE, prompt=P_IDEFICS, images=["img-100x37.png"],
         cli=dict(prompt=P_IDEFICS, template="raw")),
    dict(name="idefics3-30x90", mmproj=IDE, prompt=P_IDEFICS, images=["img-30x90.png"]),
    dict(name="idefics3-200x150", mmproj=IDE, prompt=P_IDEFICS, images=["img-200x150.png"]),
    dict(name="idefics3-two-images", mmproj=IDE, prompt=P_TWO, images=["img-100x37.png", "img-30x90.png"]),
    dict(name="idefics3-30x90-chat-template", mmproj=IDE, prompt=P_IDEFICS_CHAT, images=["img-30x90.png"],
         cli=dict(prompt="<__media__>Describe the image.", template="model")),
    dict(name="llava-64x64", mmproj=LLAVA, prompt=P_LLAVA, images=["img-64x64.png"],
         cli=dict(prompt=P_LLAVA, template="raw")),
    dict(name="llava-200x150", mmproj=LLAVA, prompt=P_LLAVA, images=["img-200x150.png"]),
    dict(name="llava-rgba-50x50", mmproj=LLAVA, prompt=P_LLAVA, images=["img-rgba-50x50.png"]),
]

N_PREDICT = 16


def fnv1a64(b: bytes) -> str:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def g7(x: float) -> float:
    return float(f"{x:.7g}")


def run_ref(bin_dir, data, case, fa):
    cmd = [os.path.join(bin_dir, "mtmd_ref"), "-m", LM, "--mmproj", case["mmproj"], "-p", case["prompt"],
           "-n", str(N_PREDICT), "--top", "5", "--threads", "2", "--fa", fa]
    for im in case["images"]:
        cmd += ["--image", im]
    p = subprocess.run(cmd, cwd=data, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"mtmd_ref failed for {case['name']}")
    return json.loads(p.stdout)


def run_cli(bin_dir, data, case):
    cli = case["cli"]
    cmd = [os.path.join(bin_dir, "llama-mtmd-cli"), "-m", LM, "--mmproj", case["mmproj"], "-p", cli["prompt"],
           "--temp", "0", "-n", str(N_PREDICT), "-t", "2", "-c", "4096", "-lv", "3", "--jinja"]
    if cli["template"] == "raw":
        # pass the prompt through unchanged: a template that prints the user message content
        cmd += ["--chat-template", "{{ messages[0]['content'] }}"]
    for im in case["images"]:
        cmd += ["--image", im]
    # the CLI prints the generation through common_log's async worker thread; under load the tail of
    # stdout is sometimes lost at exit, so retry until the output ends with the final "\n\n"
    for _ in range(5):
        p = subprocess.run(cmd, cwd=data, capture_output=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr.decode("utf-8", "replace")[-4000:])
            raise SystemExit(f"llama-mtmd-cli failed for {case['name']}")
        if p.stdout.endswith(b"\n\n"):
            break
    shown = " ".join(a if " " not in a and "\n" not in a else json.dumps(a) for a in
                     ["llama-mtmd-cli"] + cmd[1:])
    return dict(command=shown, template=cli["template"], stdout_hex=p.stdout.hex(),
                stdout=p.stdout.decode("utf-8", "replace"))


# ---- independent re-implementation of the preprocessing with Pillow, to report how close it is ----

def pil_idefics3_tiles(img: Image.Image, tile=64, longest=128):
    w, h = img.size
    ar = w / h
    if w >= h:
        rw, rh = longest, int(longest / ar)
        rh += rh % 2
    else:
        rh, rw = longest, int(longest * ar)
        rw += rw % 2
    gx, gy = (rw + tile - 1) // tile, (rh + tile - 1) // tile
    resized = img.resize((rw, rh), Image.LANCZOS) if (rw, rh) != (w, h) else img
    refined = resized.resize((gx * tile, gy * tile), Image.LANCZOS) if (gx * tile, gy * tile) != (rw, rh) else resized
    tiles = [refined.crop((x * tile, y * tile, (x + 1) * tile, (y + 1) * tile)) for y in range(gy) for x in range(gx)]
    ov = refined.resize((tile, tile), Image.LANCZOS) if refined.size != (tile, tile) else refined
    return tiles + [ov]  # mtmd order: tiles row-major, then the overview


def pil_llava_tile(img: Image.Image, size=32, pad=(122, 116, 104)):
    import math
    w, h = img.size
    if (w, h) == (size, size):
        return [img]
    s = min(size / w, size / h)
    nw, nh = min(math.ceil(w * s), size), min(math.ceil(h * s), size)
    canvas = Image.new("RGB", (size, size), pad)
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return [canvas]


def preproc_check(data, case, image_chunks):
    pil = []
    for f in case["images"]:
        img = Image.open(os.path.join(data, f)).convert("RGB")
        pil += pil_idefics3_tiles(img) if case["mmproj"] == IDE else pil_llava_tile(img)
    if len(pil) != len(image_chunks):
        return dict(error=f"tile count {len(pil)} != {len(image_chunks)}")
    worst, mism = 0, 0
    for t, c in zip(pil, image_chunks):
        a = np.frombuffer(base64.b64decode(c["rgb_b64"]), np.uint8).reshape(c["tile_ny"], c["tile_nx"], 3)
        b = np.asarray(t, np.uint8)
        d = np.abs(a.astype(int) - b.astype(int))
        worst = max(worst, int(d.max()))
        mism += int((d > 0).sum())
    return dict(pil_max_abs_diff=worst, pil_values_differing=mism)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--data", default=os.path.join(root, "tests", "data", "vision"))
    default_bin = os.path.join(os.environ.get("LLAMA_CPP_BUILD", os.path.join(os.environ.get("LLAMA_CPP_DIR", "/tmp/llsrc"), "build")), "bin")
    ap.add_argument("--bin", default=default_bin)
    ap.add_argument("--with-fa-off", action="store_true", help="also write reference_fa_off.json")
    args = ap.parse_args()
    data = args.data
    seen_tiles: set[str] = set()

    ref_on, ref_off = [], []
    for case in CASES:
        on = run_ref(args.bin, data, case, "auto")
        off = run_ref(args.bin, data, case, "off")

        # image sanity: the bitmap libmtmd decoded equals Pillow's convert("RGB") (alpha dropped)
        for f, info in zip(case["images"], on["images"]):
            rgb = Image.open(os.path.join(data, f)).convert("RGB")
            assert rgb.size == (info["nx"], info["ny"]), (f, info)
            assert fnv1a64(rgb.tobytes()) == info["rgb_fnv1a64"], f"{f}: decoded pixels differ from PIL convert('RGB')"

        img_on = [c for c in on["chunks"] if c["type"] == "image"]
        img_off = [c for c in off["chunks"] if c["type"] == "image"]
        diff = max(float(np.abs(np.array(a["embd"]) - np.array(b["embd"])).max()) for a, b in zip(img_on, img_off))
        scale = max(float(np.abs(np.array(a["embd"])).max()) for a in img_on)

        def strip(chunks, keep_rgb):
            out = []
            for c in chunks:
                if c["type"] == "text":
                    out.append(dict(type="text", tokens=c["tokens"]))
                else:
                    raw = base64.b64decode(c["rgb_b64"])
                    h = fnv1a64(raw)
                    d = dict(type="image", nx=c["nx"], ny=c["ny"], n_tokens=c["n_tokens"],
                             tile_nx=c["tile_nx"], tile_ny=c["tile_ny"], rgb_fnv1a64=h)
                    if keep_rgb and h not in seen_tiles:
                        seen_tiles.add(h)
                        d["rgb_b64"] = c["rgb_b64"]
                    d["embd"] = [g7(x) for x in c["embd"]]
                    out.append(d)
            return out

        def entry(r, keep_rgb, fa_label):
            r["top"] = [[[i, g7(l)] for i, l in step] for step in r["top"]]
            margins = [round(s[0][1] - s[1][1], 6) for s in r["top"]]
            text = b"".join(bytes.fromhex(h) for h in r["greedy_pieces_hex"])
            e = dict(name=case["name"], lm=LM, mmproj=case["mmproj"], prompt=case["prompt"], images=case["images"],
                     llama_cpp_commit=COMMIT, flash_attn=fa_label, n_embd=r["n_embd"], n_tokens=r["n_tokens"],
                     chunks=strip(r["chunks"], keep_rgb), greedy=r["greedy"],
                     greedy_text_hex=text.hex(), greedy_top5=r["top"], greedy_margin=margins)
            return e

        e_on = entry(on, True, "auto (" + "; ".join(on["log"]) + ")")
        e_on["embd_max_abs_diff_vs_fa_off"] = diff
        e_on["embd_max_abs"] = scale
        e_on["greedy_equal_fa_off"] = on["greedy"] == off["greedy"]
        e_on["preproc_check"] = preproc_check(data, case, img_on)
        if "cli" in case:
            cli = run_cli(args.bin, data, case)
            text = bytes.fromhex(e_on["greedy_text_hex"])
            cli["contains_greedy_text"] = text in bytes.fromhex(cli["stdout_hex"])
            e_on["mtmd_cli_output"] = cli
        ref_on.append(e_on)
        ref_off.append(entry(off, False, "off (" + "; ".join(off["log"]) + ")"))

        print(f"{case['name']:32s} chunks={len(on['chunks']):2d} tiles={len(img_on)} tokens={on['n_tokens']:4d} "
              f"min_margin={min(e_on['greedy_margin']):.3f} fa_on/off max|d|={diff:.2e} (max|x|={scale:.2f}) "
              f"greedy_eq={e_on['greedy_equal_fa_off']} preproc={e_on['preproc_check']}"
              + (f" cli_ok={e_on['mtmd_cli_output']['contains_greedy_text']}" if "cli" in case else ""))

    outputs = [("reference.json", ref_on)] + ([("reference_fa_off.json", ref_off)] if args.with_fa_off else [])
    for fname, cases in outputs:
        with open(os.path.join(data, fname), "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=True) for c in cases) + "\n]\n")
        print(f"wrote {os.path.join(data, fname)} ({os.path.getsize(os.path.join(data, fname))} bytes)")


if __name__ == "__main__":
    main()
