//! The vocabulary as llama.cpp reads it from GGUF metadata: token attributes, special token
//! ids (from defaults, `tokenizer.ggml.*` keys and detection by text), and token pieces.

use super::*;

/// Token attribute bits, the same as llama.cpp's `llama_token_attr`.
pub(super) mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;

    /// Maps a GGUF `tokenizer.ggml.token_type` value (llama.cpp's `llama_token_type`).
    pub fn from_gguf_type(t: i64) -> u16 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0,
        }
    }
}

/// Special token ids gathered from the defaults, the GGUF keys and detection by text.
#[derive(Default)]
pub(super) struct SpecialIds {
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) eot: Option<u32>,
    pub(super) eom: Option<u32>,
    pub(super) unk: Option<u32>,
    pub(super) fim_pre: Option<u32>,
    pub(super) fim_suf: Option<u32>,
    pub(super) fim_mid: Option<u32>,
    pub(super) fim_pad: Option<u32>,
    pub(super) fim_rep: Option<u32>,
    pub(super) fim_sep: Option<u32>,
}

impl SpecialIds {
    /// The field at a fixed index, so that a table of GGUF keys can fill the struct.
    pub(super) fn slot(&mut self, index: usize) -> &mut Option<u32> {
        match index {
            0 => &mut self.bos,
            1 => &mut self.eos,
            2 => &mut self.eot,
            3 => &mut self.eom,
            4 => &mut self.unk,
            5 => &mut self.fim_pre,
            6 => &mut self.fim_suf,
            7 => &mut self.fim_mid,
            8 => &mut self.fim_pad,
            9 => &mut self.fim_rep,
            _ => &mut self.fim_sep,
        }
    }
}

/// llama.cpp's text-based detection of EOT/EOM/FIM tokens (forcing them to be control tokens),
/// of unused control tokens, and of the end-of-generation set. Returns the sorted EOG ids.
pub(super) fn detect_special_tokens(
    texts: &[String],
    attrs: &mut [u16],
    ids: &mut SpecialIds,
) -> Vec<u32> {
    const EOT: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ];
    const EOM: &[&str] = &["<|eom_id|>"];
    const FIM_PRE: &[&str] = &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ];
    const FIM_SUF: &[&str] = &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ];
    const FIM_MID: &[&str] = &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ];
    const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
    const FIM_REP: &[&str] = &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ];
    const FIM_SEP: &[&str] = &["<|file_sep|>"];
    const EOG: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    ];

    // llama.cpp walks an unordered map, so which of several candidates becomes e.g. the EOT
    // token is unspecified there; taking the lowest id is deterministic and the EOG set, which
    // is what generation uses, does not depend on the choice.
    let mut find = |slot: &mut Option<u32>, names: &[&str]| {
        if slot.is_some() {
            return;
        }
        if let Some(i) = texts.iter().position(|t| names.contains(&t.as_str())) {
            *slot = Some(i as u32);
            attrs[i] |= attr::CONTROL;
        }
    };
    find(&mut ids.eot, EOT);
    find(&mut ids.eom, EOM);
    find(&mut ids.fim_pre, FIM_PRE);
    find(&mut ids.fim_suf, FIM_SUF);
    find(&mut ids.fim_mid, FIM_MID);
    find(&mut ids.fim_pad, FIM_PAD);
    find(&mut ids.fim_rep, FIM_REP);
    find(&mut ids.fim_sep, FIM_SEP);

    for (text, a) in texts.iter().zip(attrs.iter_mut()) {
        if *a & attr::CONTROL != 0 && text.contains("unused") {
            *a |= attr::UNUSED;
        }
    }

    let mut eog: Vec<u32> = [ids.fim_pad, ids.fim_rep, ids.fim_sep]
        .into_iter()
        .flatten()
        .collect();
    for (i, text) in texts.iter().enumerate() {
        if EOG.contains(&text.as_str()) {
            eog.push(i as u32);
            attrs[i] |= attr::CONTROL;
        }
        // gpt-oss's channel markers are always rendered, as in llama.cpp.
        if matches!(
            text.as_str(),
            "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
        ) {
            attrs[i] = attr::USER_DEFINED;
        }
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();

    let has = |eog: &[u32], name: &str| eog.iter().any(|&i| texts[i as usize] == name);
    // Harmony-style vocabularies (gpt-oss, solar-open) use `<|end|>` between messages of one
    // turn, so llama.cpp takes it out of the EOG set when `<|return|>`/`<|call|>` exist.
    if (has(&eog, "<|return|>") && has(&eog, "<|call|>") && has(&eog, "<|end|>"))
        || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>") && has(&eog, "<|end|>"))
    {
        if let Some(pos) = eog.iter().position(|&i| texts[i as usize] == "<|end|>") {
            attrs[eog[pos] as usize] = attr::USER_DEFINED;
            eog.remove(pos);
        }
    }
    // `</s>` is on the list for PaddleOCR, but Gemma 4 and PLaMo use it as ordinary text; their
    // vocabularies are recognised by `<|tool_response>` and `<|plamo:eos|>`.
    if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) && has(&eog, "</s>") {
        if let Some(pos) = eog.iter().position(|&i| texts[i as usize] == "</s>") {
            attrs[eog[pos] as usize] = attr::NORMAL;
            eog.remove(pos);
        }
    }
    eog
}

/// Appends the bytes of one token's text piece, llama.cpp's `token_to_piece` with
/// `special = true`.
pub(super) fn token_piece(text: &str, a: u16, is_bpe: bool, out: &mut Vec<u8>) {
    if a & (attr::CONTROL | attr::UNKNOWN | attr::USER_DEFINED) != 0 {
        out.extend_from_slice(text.as_bytes());
    } else if a & attr::NORMAL != 0 {
        if is_bpe {
            byte_level_decode(text, out);
        } else {
            let mut buf = [0u8; 4];
            for c in text.chars() {
                let c = if c == '\u{2581}' { ' ' } else { c };
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    } else if a & attr::BYTE != 0 {
        // Byte tokens are spelled `<0xNN>`.
        if let Some(b) = text
            .strip_prefix("<0x")
            .and_then(|t| t.strip_suffix('>'))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
        }
    }
}

/// Typed access to GGUF metadata values, lenient about integer widths as llama.cpp is.
pub(super) struct Metadata<'a>(pub(super) &'a HashMap<String, Value>);

impl<'a> Metadata<'a> {
    pub(super) fn wrong(key: &str, expected: &'static str) -> TokenizerError {
        TokenizerError::WrongType {
            key: key.to_owned(),
            expected,
        }
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::wrong(key, "string")),
        }
    }

    pub(super) fn integer(&self, key: &str) -> Result<Option<i64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => value_int(v)
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "integer")),
        }
    }

    pub(super) fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Self::wrong(key, "bool")),
        }
    }

    pub(super) fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(Self::wrong(key, "array")),
        }
    }

    pub(super) fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(Self::wrong(key, "array of strings")),
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    pub(super) fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| value_int(v).ok_or_else(|| Self::wrong(key, "array of integers")))
            .collect::<Result<_>>()
            .map(Some)
    }

    pub(super) fn float_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                // llama.cpp also accepts integer scores.
                other => value_int(other)
                    .map(|i| i as f32)
                    .ok_or_else(|| Self::wrong(key, "array of numbers")),
            })
            .collect::<Result<_>>()
            .map(Some)
    }
}

pub(super) fn value_int(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}
