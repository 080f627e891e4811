// mtmd_ref: dump what llama.cpp's libmtmd does with a prompt + images, as one JSON object on stdout.
//
// Reference oracle for ferrum's image input. Built by build_ref.sh against a llama.cpp build.
//
//   mtmd_ref -m LM.gguf --mmproj MMPROJ.gguf -p "PROMPT with <__media__>" --image A.png [--image B.png ...]
//            [-n 16] [--top 5] [--threads 2] [--fa auto|on|off] [--no-decode] [--no-preproc] [--time N]
//            [--dump DIR]   (debug: every named, contiguous f32 node of the first image encode -> DIR/NNN.bin
//                            raw little-endian f32 in ggml order, with DIR/index.json {file,name,op,ne})
//
// Normal mode: loads the LM (CPU) and the mmproj (use_gpu=false, print_timings=false, warmup=true,
// flash_attn_type as --fa, default AUTO like llama-mtmd-cli), loads each image with
// mtmd_helper_bitmap_init_from_file, runs mtmd_tokenize(add_special=true, parse_special=true), then:
//   text chunk  -> {"type":"text","tokens":[...]}
//   image chunk -> {"type":"image","id":..,"nx":..,"ny":..,"n_tokens":..,"n_pos":..,
//                   "tile_nx":..,"tile_ny":..,"rgb_b64":..,"rgb_exact":..,"embd":[n_tokens*n_embd floats]}
//                  embd comes from mtmd_encode_chunk + mtmd_get_output_embd (row-major, one row per token);
//                  tile_* / rgb_b64 is the encoder's input image (the "inp_raw" graph input, captured with
//                  cb_eval and mapped back to u8: round((x*std + mean)*255), RGB interleaved, row-major)
// then mtmd_helper_eval_chunks(n_past 0, seq 0, n_batch 512, logits_last true) and n greedy steps
// (llama_sampler_init_greedy; EOG is not a stop: all n steps are run), with the top-k (id, logit)
// of the logits each step was sampled from.
//
// --time N: encode every image chunk N times (after one untimed encode each), print medians:
//   {"timing":{"n":N,"threads":T,"fa":..,"chunks":[{"n_tokens":..,"median_ms":..}],"n_image_chunks":..,"image_median_ms":..},"log":[..]}
//   (image_median_ms is the median over the N rounds of the sum over all image chunks).

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cctype>
#include <string>
#include <vector>

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif

static std::vector<std::string> g_log_lines;

static void log_cb(enum ggml_log_level level, const char * text, void * /*user*/) {
    (void) level;
    fputs(text, stderr);
    std::string lower(text);
    for (auto & ch : lower) ch = (char) tolower((unsigned char) ch);
    if (lower.find("flash attention") != std::string::npos || lower.find("flash_attn    ") != std::string::npos) {
        std::string s(text);
        while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
        g_log_lines.push_back(s);
    }
}

static std::string json_str(const std::string & s) {
    std::string o = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"':  o += "\\\""; break;
            case '\\': o += "\\\\"; break;
            case '\n': o += "\\n"; break;
            case '\r': o += "\\r"; break;
            case '\t': o += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof(buf), "\\u%04x", c);
                    o += buf;
                } else {
                    o += (char) c;
                }
        }
    }
    return o + "\"";
}

static std::string hex(const std::string & s) {
    static const char * d = "0123456789abcdef";
    std::string o;
    for (unsigned char c : s) { o += d[c >> 4]; o += d[c & 15]; }
    return o;
}

static std::string b64(const std::vector<uint8_t> & v) {
    static const char * t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string o;
    size_t i = 0;
    for (; i + 2 < v.size(); i += 3) {
        uint32_t n = (v[i] << 16) | (v[i + 1] << 8) | v[i + 2];
        o += t[(n >> 18) & 63]; o += t[(n >> 12) & 63]; o += t[(n >> 6) & 63]; o += t[n & 63];
    }
    if (i + 1 == v.size()) {
        uint32_t n = v[i] << 16;
        o += t[(n >> 18) & 63]; o += t[(n >> 12) & 63]; o += "==";
    } else if (i + 2 == v.size()) {
        uint32_t n = (v[i] << 16) | (v[i + 1] << 8);
        o += t[(n >> 18) & 63]; o += t[(n >> 12) & 63]; o += t[(n >> 6) & 63]; o += "=";
    }
    return o;
}

static uint64_t fnv1a64(const unsigned char * p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return h;
}

static std::string fmt_f(float x) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%.9g", (double) x);
    return buf;
}

static std::string piece(const llama_vocab * vocab, llama_token t) {
    std::string s(64, '\0');
    int n = llama_token_to_piece(vocab, t, &s[0], (int32_t) s.size(), 0, true);
    if (n < 0) {
        s.resize(-n);
        n = llama_token_to_piece(vocab, t, &s[0], (int32_t) s.size(), 0, true);
    }
    s.resize(std::max(n, 0));
    return s;
}

// ---- capture of the encoder input ("inp_raw") through the scheduler eval callback ----
struct capture_state {
    bool enabled = false;
    std::string dump_dir;   // --dump DIR: write every named f32 node of the first encode
    bool dumping = false;
    int n_dumped = 0;
    std::string index;
    int nx = 0, ny = 0;
    std::vector<float> data; // planar [3][ny][nx]
};

static bool eval_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * st = (capture_state *) user_data;
    const ggml_tensor * raw = nullptr;
    for (int i = 0; i < GGML_MAX_SRC; i++) {
        if (t->src[i] && strcmp(t->src[i]->name, "inp_raw") == 0) {
            raw = t->src[i];
            break;
        }
    }
    if (ask) {
        return raw != nullptr || st->dumping;
    }
    if (st->dumping && t->type == GGML_TYPE_F32 && ggml_is_contiguous(t) && t->name[0] != '\0') {
        std::vector<float> buf(ggml_nelements(t));
        ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
        char fname[512];
        snprintf(fname, sizeof(fname), "%s/%03d.bin", st->dump_dir.c_str(), st->n_dumped);
        FILE * f = fopen(fname, "wb");
        if (f) { fwrite(buf.data(), sizeof(float), buf.size(), f); fclose(f); }
        char line[512];
        snprintf(line, sizeof(line), "%s{\"file\":\"%03d.bin\",\"name\":\"%s\",\"op\":\"%s\",\"ne\":[%lld,%lld,%lld,%lld]}",
                 st->n_dumped ? ",\n" : "", st->n_dumped, t->name, ggml_op_desc(t),
                 (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3]);
        st->index += line;
        st->n_dumped++;
    }
    if (raw && st->enabled && raw->type == GGML_TYPE_F32 && raw->ne[2] == 3) {
        st->nx = (int) raw->ne[0];
        st->ny = (int) raw->ne[1];
        st->data.resize(ggml_nelements(raw));
        ggml_backend_tensor_get(raw, st->data.data(), 0, ggml_nbytes(raw));
    }
    return true;
}

static bool read_mean_std(const char * fname, float mean[3], float stdv[3]) {
    gguf_init_params p = { /*no_alloc*/ true, /*ctx*/ nullptr };
    gguf_context * g = gguf_init_from_file(fname, p);
    if (!g) return false;
    bool ok = true;
    const char * keys[2] = { "clip.vision.image_mean", "clip.vision.image_std" };
    float * dst[2] = { mean, stdv };
    for (int k = 0; k < 2; k++) {
        int64_t id = gguf_find_key(g, keys[k]);
        if (id < 0 || gguf_get_arr_n(g, id) < 3) { ok = false; break; }
        const float * a = (const float *) gguf_get_arr_data(g, id);
        for (int c = 0; c < 3; c++) dst[k][c] = a[c];
    }
    gguf_free(g);
    return ok;
}

static double median(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void usage(const char * argv0) {
    fprintf(stderr,
        "usage: %s -m LM.gguf --mmproj MMPROJ.gguf -p PROMPT --image FILE [--image FILE ...]\n"
        "          [-n N_PREDICT=16] [--top K=5] [--threads T=2] [--fa auto|on|off]\n"
        "          [--no-decode] [--no-preproc] [--time N] [--dump DIR]\n", argv0);
}

int main(int argc, char ** argv) {
    std::string model_path, mmproj_path, prompt;
    std::vector<std::string> images;
    int n_predict = 16, top_k = 5, n_threads = 2, time_n = 0;
    bool do_decode = true, do_preproc = true;
    std::string fa = "auto";
    capture_state cap;

    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) { usage(argv[0]); exit(2); }
            return argv[++i];
        };
        if (a == "-m") model_path = next();
        else if (a == "--mmproj") mmproj_path = next();
        else if (a == "-p") prompt = next();
        else if (a == "--image") images.push_back(next());
        else if (a == "-n") n_predict = atoi(next().c_str());
        else if (a == "--top") top_k = atoi(next().c_str());
        else if (a == "--threads") n_threads = atoi(next().c_str());
        else if (a == "--fa") fa = next();
        else if (a == "--no-decode") do_decode = false;
        else if (a == "--no-preproc") do_preproc = false;
        else if (a == "--time") time_n = atoi(next().c_str());
        else if (a == "--dump") cap.dump_dir = next();
        else { usage(argv[0]); return 2; }
    }
    if (model_path.empty() || mmproj_path.empty() || images.empty()) { usage(argv[0]); return 2; }

    enum llama_flash_attn_type fa_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
    if (fa == "on") fa_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    else if (fa == "off") fa_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    else if (fa != "auto") { usage(argv[0]); return 2; }

    llama_log_set(log_cb, nullptr);
    mtmd_helper_log_set(log_cb, nullptr);
    ggml_backend_load_all();
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "failed to load %s\n", model_path.c_str()); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 4096;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = fa_type;
    cp.no_perf = true;
    llama_context * lctx = llama_init_from_model(model, cp);
    if (!lctx) { fprintf(stderr, "failed to create context\n"); return 1; }

    mtmd_context_params mparams = mtmd_context_params_default();
    mparams.use_gpu = false;
    mparams.print_timings = false;
    mparams.n_threads = n_threads;
    mparams.flash_attn_type = fa_type;
    mparams.warmup = true;
    if ((do_preproc || !cap.dump_dir.empty()) && time_n == 0) {
        mparams.cb_eval = eval_cb;
        mparams.cb_eval_user_data = &cap;
    }
    mtmd_context * mctx = mtmd_init_from_file(mmproj_path.c_str(), model, mparams);
    if (!mctx) { fprintf(stderr, "failed to load mmproj %s\n", mmproj_path.c_str()); return 1; }

    float mean[3] = {0, 0, 0}, stdv[3] = {1, 1, 1};
    const bool have_norm = read_mean_std(mmproj_path.c_str(), mean, stdv);

    std::vector<mtmd_bitmap *> bitmaps;
    std::string images_json = "[";
    for (size_t i = 0; i < images.size(); i++) {
        auto w = mtmd_helper_bitmap_init_from_file(mctx, images[i].c_str(), false, mtmd_helper_init_opt_default());
        if (!w.bitmap) { fprintf(stderr, "failed to load image %s\n", images[i].c_str()); return 1; }
        bitmaps.push_back(w.bitmap);
        char buf[256];
        snprintf(buf, sizeof(buf), "{\"nx\":%u,\"ny\":%u,\"rgb_fnv1a64\":\"%016llx\"}",
                 mtmd_bitmap_get_nx(w.bitmap), mtmd_bitmap_get_ny(w.bitmap),
                 (unsigned long long) fnv1a64(mtmd_bitmap_get_data(w.bitmap), mtmd_bitmap_get_n_bytes(w.bitmap)));
        images_json += (i ? "," : "") + std::string(buf);
    }
    images_json += "]";

    mtmd_input_text txt = { prompt.c_str(), prompt.size(), /*add_special*/ true, /*parse_special*/ true };
    mtmd_input_chunks * chunks = mtmd_input_chunks_init();
    int32_t res = mtmd_tokenize(mctx, chunks, &txt, (const mtmd_bitmap **) bitmaps.data(), bitmaps.size());
    if (res != 0) { fprintf(stderr, "mtmd_tokenize failed: %d\n", res); return 1; }
    const size_t n_chunks = mtmd_input_chunks_size(chunks);
    const int n_embd = llama_model_n_embd_inp(model);

    if (time_n > 0) {
        std::vector<std::vector<double>> per_chunk;
        std::vector<size_t> idx;
        for (size_t i = 0; i < n_chunks; i++) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks, i);
            if (mtmd_input_chunk_get_type(c) != MTMD_INPUT_CHUNK_TYPE_IMAGE) continue;
            idx.push_back(i);
            if (mtmd_encode_chunk(mctx, c) != 0) { fprintf(stderr, "encode failed\n"); return 1; } // untimed
        }
        per_chunk.resize(idx.size());
        std::vector<double> per_round;
        for (int r = 0; r < time_n; r++) {
            double sum = 0;
            for (size_t k = 0; k < idx.size(); k++) {
                const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks, idx[k]);
                auto t0 = std::chrono::steady_clock::now();
                if (mtmd_encode_chunk(mctx, c) != 0) { fprintf(stderr, "encode failed\n"); return 1; }
                auto t1 = std::chrono::steady_clock::now();
                double ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
                per_chunk[k].push_back(ms);
                sum += ms;
            }
            per_round.push_back(sum);
        }
        std::string o = "{\"timing\":{\"n\":" + std::to_string(time_n) + ",\"threads\":" + std::to_string(n_threads) +
                        ",\"fa\":" + json_str(fa) + ",\"chunks\":[";
        for (size_t k = 0; k < idx.size(); k++) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks, idx[k]);
            char buf[128];
            snprintf(buf, sizeof(buf), "{\"n_tokens\":%zu,\"median_ms\":%.3f}", mtmd_input_chunk_get_n_tokens(c), median(per_chunk[k]));
            o += (k ? "," : "") + std::string(buf);
        }
        char buf[128];
        snprintf(buf, sizeof(buf), "],\"n_image_chunks\":%zu,\"image_median_ms\":%.3f}", idx.size(), median(per_round));
        o += buf;
        o += ",\"log\":[";
        for (size_t i = 0; i < g_log_lines.size(); i++) o += (i ? "," : "") + json_str(g_log_lines[i]);
        o += "]}\n";
        fputs(o.c_str(), stdout);
        return 0;
    }

    std::string out = "{";
    out += "\"n_embd\":" + std::to_string(n_embd);
    out += ",\"fa\":" + json_str(fa);
    out += ",\"threads\":" + std::to_string(n_threads);
    out += ",\"images\":" + images_json;
    out += ",\"chunks\":[";
    size_t n_tokens_total = 0;
    for (size_t i = 0; i < n_chunks; i++) {
        const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks, i);
        out += i ? "," : "";
        n_tokens_total += mtmd_input_chunk_get_n_tokens(c);
        if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * toks = mtmd_input_chunk_get_tokens_text(c, &n);
            out += "{\"type\":\"text\",\"tokens\":[";
            for (size_t j = 0; j < n; j++) out += (j ? "," : "") + std::to_string(toks[j]);
            out += "],\"pieces_hex\":[";
            for (size_t j = 0; j < n; j++) out += (j ? "," : "") + json_str(hex(piece(vocab, toks[j])));
            out += "]}";
            continue;
        }
        if (mtmd_input_chunk_get_type(c) != MTMD_INPUT_CHUNK_TYPE_IMAGE) {
            fprintf(stderr, "unexpected chunk type\n");
            return 1;
        }
        const mtmd_image_tokens * it = mtmd_input_chunk_get_tokens_image(c);
        const size_t nt = mtmd_input_chunk_get_n_tokens(c);
        cap.enabled = true;
        cap.data.clear();
        cap.dumping = !cap.dump_dir.empty() && cap.n_dumped == 0;
        auto t0 = std::chrono::steady_clock::now();
        if (mtmd_encode_chunk(mctx, c) != 0) { fprintf(stderr, "mtmd_encode_chunk failed\n"); return 1; }
        auto t1 = std::chrono::steady_clock::now();
        cap.enabled = false;
        if (cap.dumping) {
            cap.dumping = false;
            FILE * f = fopen((cap.dump_dir + "/index.json").c_str(), "w");
            if (f) { fprintf(f, "[\n%s\n]\n", cap.index.c_str()); fclose(f); }
        }
        const float * embd = mtmd_get_output_embd(mctx);
        char buf[256];
        snprintf(buf, sizeof(buf), "{\"type\":\"image\",\"nx\":%zu,\"ny\":%zu,\"n_tokens\":%zu,\"n_pos\":%d,\"encode_ms\":%.3f",
                 mtmd_image_tokens_get_nx(it), mtmd_image_tokens_get_ny(it), nt,
                 (int) mtmd_input_chunk_get_n_pos(c),
                 std::chrono::duration<double, std::milli>(t1 - t0).count());
        out += buf;
        out += ",\"id\":" + json_str(mtmd_input_chunk_get_id(c) ? mtmd_input_chunk_get_id(c) : "");
        if (!cap.data.empty() && have_norm) {
            const int nx = cap.nx, ny = cap.ny, np = nx * ny;
            std::vector<uint8_t> rgb((size_t) np * 3);
            bool exact = true;
            for (int y = 0; y < ny; y++) {
                for (int x = 0; x < nx; x++) {
                    for (int ch = 0; ch < 3; ch++) {
                        const float v = cap.data[(size_t) ch * np + (size_t) y * nx + x];
                        long u = lrintf((v * stdv[ch] + mean[ch]) * 255.0f);
                        u = std::min(255L, std::max(0L, u));
                        rgb[((size_t) y * nx + x) * 3 + ch] = (uint8_t) u;
                        const float back = ((float) u / 255.0f - mean[ch]) / stdv[ch];
                        if (back != v) exact = false;
                    }
                }
            }
            out += ",\"tile_nx\":" + std::to_string(nx) + ",\"tile_ny\":" + std::to_string(ny);
            out += std::string(",\"rgb_exact\":") + (exact ? "true" : "false");
            out += ",\"rgb_b64\":" + json_str(b64(rgb));
        }
        out += ",\"embd\":[";
        for (size_t j = 0; j < nt * (size_t) n_embd; j++) out += (j ? "," : "") + fmt_f(embd[j]);
        out += "]}";
    }
    out += "]";
    out += ",\"n_tokens\":" + std::to_string(n_tokens_total);

    if (do_decode) {
        llama_pos n_past = 0;
        res = mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, 512, true, &n_past);
        if (res != 0) { fprintf(stderr, "mtmd_helper_eval_chunks failed: %d\n", res); return 1; }
        out += ",\"n_past\":" + std::to_string(n_past);

        llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
        const int n_vocab = llama_vocab_n_tokens(vocab);
        std::vector<llama_token> gen;
        std::string steps = "[";
        for (int s = 0; s < n_predict; s++) {
            const float * logits = llama_get_logits_ith(lctx, -1);
            if (!logits) {
                fprintf(stderr, "no logits (mtmd_helper_eval_chunks only outputs logits for a final *text* chunk: end the prompt with text)\n");
                return 1;
            }
            std::vector<int> order(n_vocab);
            for (int v = 0; v < n_vocab; v++) order[v] = v;
            const int k = std::min(top_k, n_vocab);
            std::partial_sort(order.begin(), order.begin() + k, order.end(),
                              [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
            steps += s ? ",[" : "[";
            for (int j = 0; j < k; j++) {
                steps += (j ? ",[" : "[") + std::to_string(order[j]) + "," + fmt_f(logits[order[j]]) + "]";
            }
            steps += "]";
            llama_token tok = llama_sampler_sample(smpl, lctx, -1);
            gen.push_back(tok);
            llama_batch b = llama_batch_get_one(&tok, 1);
            if (llama_decode(lctx, b) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
        }
        steps += "]";
        out += ",\"greedy\":[";
        for (size_t j = 0; j < gen.size(); j++) out += (j ? "," : "") + std::to_string(gen[j]);
        out += "],\"greedy_pieces_hex\":[";
        for (size_t j = 0; j < gen.size(); j++) out += (j ? "," : "") + json_str(hex(piece(vocab, gen[j])));
        out += "],\"greedy_is_eog\":[";
        for (size_t j = 0; j < gen.size(); j++) out += std::string(j ? "," : "") + (llama_vocab_is_eog(vocab, gen[j]) ? "true" : "false");
        out += "],\"top\":" + steps;
        llama_sampler_free(smpl);
    }

    out += ",\"log\":[";
    for (size_t i = 0; i < g_log_lines.size(); i++) out += (i ? "," : "") + json_str(g_log_lines[i]);
    out += "]}\n";
    fputs(out.c_str(), stdout);

    mtmd_input_chunks_free(chunks);
    for (auto * b : bitmaps) mtmd_bitmap_free(b);
    mtmd_free(mctx);
    llama_free(lctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
