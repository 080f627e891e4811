#!/usr/bin/env python3
"""Executable spec: the two mmproj encoders in numpy, checked against llama.cpp's reference outputs.

    scripts/vision_fixtures/np_encoder.py [--data tests/data/vision]

Starts from each image chunk's encoder input (rgb_b64 in reference.json, i.e. after llama.cpp's
resize/tiling) and recomputes the embeddings from the GGUF weights in three numeric modes:

  f32        plain float32 everywhere (weights as stored, f16 weights widened to f32)
  ggml       emulates ggml-cpu: activations rounded to f16 before every matmul with an f16 weight,
             patch conv with pixels AND kernel rounded to f16 (ggml_conv_2d's im2col is always F16,
             even for an F32 kernel), gelu / gelu_quick through ggml's f16
             lookup tables, f32 attention (= flash attention off)
  ggml-fa    as ggml, plus ggml-cpu's flash attention: K,V rounded to f16; for n_pos >= 64 (tiled
             kernel) Q stays f32 and accumulation is f32; for n_pos < 64 (one_chunk kernel) Q is
             rounded to f16 and V*softmax is accumulated in an f16 buffer

and prints the max |difference| to reference.json (FA on) and, when present, reference_fa_off.json.
Per-op the ggml mode matches llama.cpp to ~1e-7 (checked with mtmd_ref --dump); end to end the
residual is ~1e-3: single f16 rounding flips (e.g. a gelu table entry computed with a different
tanhf/FMA contraction) are amplified by the later f16 roundings. That is the noise floor.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys

import numpy as np

try:
    import gguf
except ImportError:
    sys.path.insert(0, os.path.join(os.environ.get("LLAMA_CPP_DIR", "/tmp/llsrc"), "gguf-py"))
    import gguf


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def gelu_tanh(x):
    x = x.astype(np.float32)
    return (0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * x * (1.0 + np.float32(0.044715) * x * x)))).astype(np.float32)


def gelu_quick(x):
    x = x.astype(np.float32)
    return (x * (1.0 / (1.0 + np.exp(np.float32(-1.702) * x)))).astype(np.float32)


class Model:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.kv = {}
        for f in r.fields.values():
            if f.name.startswith("clip.") and f.types:
                v = f.contents()
                self.kv[f.name] = v
        self.t = {}
        self.is_f16 = {}
        for t in r.tensors:
            self.t[t.name] = np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
            self.is_f16[t.name] = t.tensor_type == gguf.GGMLQuantizationType.F16

    def has(self, n):
        return n in self.t


class Enc:
    def __init__(self, m: Model, mode: str):
        self.m, self.mode = m, mode
        self.emul = mode != "f32"
        self.fa = mode == "ggml-fa"

    def mm(self, wname, x):
        """ggml_mul_mat(w, x): x [n, in] -> [n, out]"""
        w = self.m.t[wname]
        if self.emul and self.m.is_f16[wname]:
            x = f16(x)
        return (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)

    def act(self, x, kind):
        if kind == "gelu":
            if not self.emul:
                return gelu_tanh(x)
            xh = f16(x)
            y = f16(gelu_tanh(xh))
            return np.where(x <= -10, 0.0, np.where(x >= 10, x, y)).astype(np.float32)
        if not self.emul:
            return gelu_quick(x)
        return f16(gelu_quick(f16(x)))

    def ln(self, x, w, b, eps):
        mu = x.mean(-1, keepdims=True, dtype=np.float64)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        y = ((x - mu) / np.sqrt(var + eps)).astype(np.float32)
        return (y * self.m.t[w] + self.m.t[b]).astype(np.float32)

    def attn(self, q, k, v, n_head):
        n, d = q.shape
        dh = d // n_head
        scale = np.float32(1.0 / math.sqrt(dh))
        out = np.zeros_like(q)
        for h in range(n_head):
            qh, kh, vh = (a[:, h * dh:(h + 1) * dh] for a in (q, k, v))
            if self.fa:
                kh, vh = f16(kh), f16(vh)
                if n < 64:  # one_chunk kernel: Q -> f16, f16 V accumulator with online softmax
                    qh = f16(qh)
                    s = (qh.astype(np.float64) @ kh.T.astype(np.float64)).astype(np.float32) * scale
                    M = np.full(n, -np.inf, np.float32)
                    S = np.zeros(n, np.float32)
                    acc = np.zeros((n, dh), np.float32)  # values held in f16
                    for j in range(n):
                        sj = s[:, j]
                        newmax = sj > M
                        ms = np.where(newmax, np.exp(M - sj), 1.0).astype(np.float32)
                        vs = np.where(newmax, 1.0, np.exp(sj - np.where(newmax, sj, M))).astype(np.float32)
                        M = np.where(newmax, sj, M)
                        acc = f16(acc * ms[:, None])
                        acc = f16(acc + vh[j][None, :] * vs[:, None])
                        S = S * ms + vs
                    out[:, h * dh:(h + 1) * dh] = acc / S[:, None]
                    continue
            s = (qh.astype(np.float64) @ kh.T.astype(np.float64)).astype(np.float32) * scale
            s = s - s.max(-1, keepdims=True)
            p = np.exp(s)
            p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
            out[:, h * dh:(h + 1) * dh] = (p.astype(np.float64) @ vh.astype(np.float64)).astype(np.float32)
        return out

    def patchify(self, img):
        """img: planar [3, H, W] f32 -> [n_patches, n_embd]; patch order row-major (y, then x)"""
        w = self.m.t["v.patch_embd.weight"]  # [n_embd, 3, p, p]
        n_embd, _, p, _ = w.shape
        _, H, W = img.shape
        cols = img.reshape(3, H // p, p, W // p, p).transpose(1, 3, 0, 2, 4).reshape((H // p) * (W // p), 3 * p * p)
        wk = w.reshape(n_embd, -1)
        if self.emul:
            # ggml_conv_2d: im2col is F16 for any non-BF16 kernel, and it is the mul_mat's src0, so the
            # (even F32) kernel is converted to f16 too: pixels and weights both rounded to f16
            cols, wk = f16(cols), f16(wk)
        x = (cols.astype(np.float64) @ wk.T.astype(np.float64)).astype(np.float32)
        if self.m.has("v.patch_embd.bias"):
            x = x + self.m.t["v.patch_embd.bias"]
        return x

    def block(self, x, il, eps, n_head, act):
        p = f"v.blk.{il}."
        t = self.m.t
        h = self.ln(x, p + "ln1.weight", p + "ln1.bias", eps)
        q = self.mm(p + "attn_q.weight", h) + t[p + "attn_q.bias"]
        k = self.mm(p + "attn_k.weight", h) + t[p + "attn_k.bias"]
        v = self.mm(p + "attn_v.weight", h) + t[p + "attn_v.bias"]
        a = self.mm(p + "attn_out.weight", self.attn(q, k, v, n_head)) + t[p + "attn_out.bias"]
        x = x + a
        h = self.ln(x, p + "ln2.weight", p + "ln2.bias", eps)
        up, down = p + "ffn_up", p + "ffn_down"
        if t[down + ".weight"].shape[1] == x.shape[1]:  # legacy llava naming: ffn_down is fc1 -> swap
            up, down = down, up
        h = self.mm(up + ".weight", h) + t[up + ".bias"]
        h = self.act(h, act)
        h = self.mm(down + ".weight", h) + t[down + ".bias"]
        return x + h

    def encode(self, rgb_u8):
        kv = self.m.kv
        mean = np.array(kv["clip.vision.image_mean"], np.float32)
        std = np.array(kv["clip.vision.image_std"], np.float32)
        img = ((rgb_u8.astype(np.float32) / np.float32(255.0) - mean) / std).astype(np.float32).transpose(2, 0, 1)
        eps = float(kv["clip.vision.attention.layer_norm_epsilon"])
        n_head = int(kv["clip.vision.attention.head_count"])
        n_layer = int(kv["clip.vision.block_count"])
        proj = kv["clip.projector_type"]
        t = self.m.t
        x = self.patchify(img)
        if proj == "idefics3":
            act = "gelu" if kv.get("clip.use_gelu") else "gelu_quick"
            x = x + t["v.position_embd.weight"]
            for il in range(n_layer):
                x = self.block(x, il, eps, n_head, act)
            x = self.ln(x, "v.post_ln.weight", "v.post_ln.bias", eps)
            s = int(kv["clip.vision.projector.scale_factor"])
            H, W = img.shape[1] // int(kv["clip.vision.patch_size"]), img.shape[2] // int(kv["clip.vision.patch_size"])
            n_embd = x.shape[1]
            # pixel shuffle: token (yg, xg) = concat over dy, dx of patch (yg*s+dy, xg*s+dx)
            x = x.reshape(H // s, s, W // s, s, n_embd).transpose(0, 2, 1, 3, 4).reshape((H // s) * (W // s), s * s * n_embd)
            return self.mm("mm.model.fc.weight", x)
        if proj == "mlp":
            act = "gelu" if kv.get("clip.use_gelu") else "gelu_quick"
            n_patches = x.shape[0]
            # llama.cpp appends the class embedding AFTER the patches and gives row i position i
            x = np.concatenate([x, t["v.class_embd"][None, :]], 0)
            x = x + t["v.position_embd.weight"][: n_patches + 1]
            x = self.ln(x, "v.pre_ln.weight", "v.pre_ln.bias", eps)
            for il in range(n_layer - 1):  # no feature_layer key: runs n_layer-1 blocks
                x = self.block(x, il, eps, n_head, act)
            x = x[1: n_patches + 1]  # "patches" = rows 1..n_patches
            x = self.mm("mm.0.weight", x) + t["mm.0.bias"]
            x = self.act(x, "gelu")  # ggml_gelu (tanh approximation) in the projector
            return self.mm("mm.2.weight", x) + t["mm.2.bias"]
        raise SystemExit(f"projector {proj} not covered")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--data", default=os.path.join(root, "tests", "data", "vision"))
    args = ap.parse_args()
    ref_on = json.load(open(os.path.join(args.data, "reference.json")))
    off_path = os.path.join(args.data, "reference_fa_off.json")
    ref_off = json.load(open(off_path)) if os.path.exists(off_path) else [None] * len(ref_on)
    tiles = {c["rgb_fnv1a64"]: c["rgb_b64"] for case in ref_on for c in case["chunks"] if "rgb_b64" in c}
    models = {}
    print(f"{'case':30s} {'mode':8s} {'vs fa_on':>10s} {'vs fa_off':>10s}   max|ref|")
    for con, coff in zip(ref_on, ref_off):
        m = models.setdefault(con["mmproj"], Model(os.path.join(args.data, con["mmproj"])))
        ion = [c for c in con["chunks"] if c["type"] == "image"]
        ioff = [c for c in coff["chunks"] if c["type"] == "image"] if coff else [None] * len(ion)
        for mode in ("f32", "ggml", "ggml-fa"):
            enc = Enc(m, mode)
            d_on = d_off = 0.0
            mx = 0.0
            for a, b in zip(ion, ioff):
                raw = base64.b64decode(tiles[a["rgb_fnv1a64"]])
                rgb = np.frombuffer(raw, np.uint8).reshape(a["tile_ny"], a["tile_nx"], 3)
                y = enc.encode(rgb).reshape(-1)
                d_on = max(d_on, float(np.abs(y - np.array(a["embd"], np.float32)).max()))
                if b:
                    d_off = max(d_off, float(np.abs(y - np.array(b["embd"], np.float32)).max()))
                mx = max(mx, float(np.abs(np.array(a["embd"])).max()))
            off = f"{d_off:10.2e}" if coff else f"{'-':>10s}"
            print(f"{con['name']:30s} {mode:8s} {d_on:10.2e} {off}   {mx:.2f}")


if __name__ == "__main__":
    main()
