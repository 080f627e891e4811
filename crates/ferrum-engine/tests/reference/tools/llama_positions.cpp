// Dumps llama.cpp's next-token predictions at every position of a prompt, as JSON, for the
// engine's long-prompt reference tests (YaRN rope scaling, q8_0 KV cache). Not part of the
// build: compile it against a llama.cpp build (see ../README.md) and run it by hand.
//
//   llama_positions MODEL TEXT_FILE N_TOKENS [--yarn FACTOR ORIG_CTX] [--kv q8_0] [--fa] [--special] [--lora ADAPTER]
//
// The text is tokenized as the model adds special tokens and cut to N_TOKENS. The prompt is
// decoded in batches of 512 (llama.cpp's default) with logits for every position; for each
// position the 5 most likely next tokens and their log-probabilities are printed.
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL TEXT_FILE N_TOKENS [--yarn FACTOR ORIG_CTX] [--kv q8_0] [--fa] [--special] [--lora ADAPTER]\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[1];
    std::ifstream in(argv[2]);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    const int n_tokens = atoi(argv[3]);
    float yarn_factor = 0.0f;
    int yarn_orig = 0;
    bool q8 = false, fa = false, special = false;
    const char * lora_path = nullptr;
    for (int i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--yarn") && i + 2 < argc) {
            yarn_factor = atof(argv[++i]);
            yarn_orig = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--kv") && i + 1 < argc) {
            q8 = !strcmp(argv[++i], "q8_0");
        } else if (!strcmp(argv[i], "--fa")) {
            fa = true;
        } else if (!strcmp(argv[i], "--special")) {
            special = true;
        } else if (!strcmp(argv[i], "--lora") && i + 1 < argc) {
            lora_path = argv[++i];
        } else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", model_path); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    std::vector<llama_token> ids(text.size() + 16);
    int n = llama_tokenize(vocab, text.c_str(), (int) text.size(), ids.data(), (int) ids.size(), true, special);
    if (n < 0) { fprintf(stderr, "tokenize failed\n"); return 1; }
    ids.resize(std::min(n, n_tokens));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) ids.size() + 16;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (yarn_factor > 0.0f) {
        cp.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_YARN;
        cp.rope_freq_scale = 1.0f / yarn_factor;
        cp.yarn_orig_ctx = (uint32_t) yarn_orig;
    }
    if (q8) {
        cp.type_k = GGML_TYPE_Q8_0;
        cp.type_v = GGML_TYPE_Q8_0;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create the context\n"); return 1; }
    if (lora_path) {
        llama_adapter_lora * adapter = llama_adapter_lora_init(model, lora_path);
        if (!adapter) { fprintf(stderr, "cannot load the adapter %s\n", lora_path); return 1; }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &adapter, 1, &scale) != 0) { fprintf(stderr, "cannot set the adapter\n"); return 1; }
    }

    const int n_vocab = llama_vocab_n_tokens(vocab);
    printf("{\n  \"settings\": {\"tokens\": %zu, \"yarn_factor\": %g, \"yarn_orig_ctx\": %d, \"kv\": \"%s\", \"flash_attn\": %s, \"lora\": %s},\n",
           ids.size(), yarn_factor, yarn_orig, q8 ? "q8_0" : "f16", fa ? "true" : "false", lora_path ? "true" : "false");
    printf("  \"ids\": [");
    for (size_t i = 0; i < ids.size(); i++) printf("%s%d", i ? "," : "", ids[i]);
    printf("],\n  \"top\": [\n");
    bool first = true;
    for (size_t start = 0; start < ids.size(); start += 512) {
        const int len = (int) std::min<size_t>(512, ids.size() - start);
        llama_batch batch = llama_batch_init(len, 0, 1);
        for (int i = 0; i < len; i++) {
            batch.token[i] = ids[start + i];
            batch.pos[i] = (llama_pos) (start + i);
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        batch.n_tokens = len;
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
        for (int i = 0; i < len; i++) {
            const float * lg = llama_get_logits_ith(ctx, i);
            double mx = lg[0];
            for (int v = 1; v < n_vocab; v++) mx = std::max(mx, (double) lg[v]);
            double sum = 0;
            for (int v = 0; v < n_vocab; v++) sum += std::exp((double) lg[v] - mx);
            const double lse = mx + std::log(sum);
            std::vector<int> order(n_vocab);
            for (int v = 0; v < n_vocab; v++) order[v] = v;
            std::partial_sort(order.begin(), order.begin() + 5, order.end(),
                              [&](int a, int b) { return lg[a] > lg[b] || (lg[a] == lg[b] && a < b); });
            printf("%s    [", first ? "" : ",\n");
            first = false;
            for (int k = 0; k < 5; k++) {
                printf("%s[%d,%.5f]", k ? "," : "", order[k], lg[order[k]] - lse);
            }
            printf("]");
        }
        llama_batch_free(batch);
    }
    printf("\n  ]\n}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
