//! `tojson` as llama.cpp's Jinja engine writes it: `", "` and `": "` separators, non-ASCII text
//! kept, key order kept, floats printed as C++'s `std::ostream` prints them.

use super::*;

/// How `tojson` lays out JSON (llama.cpp's `value_to_json`).
pub(super) struct JsonStyle {
    /// `None` for one line; `Some(n)` puts items on their own lines, indented by `n` spaces.
    pub(super) indent: Option<usize>,
    pub(super) item_separator: String,
    pub(super) key_separator: String,
    pub(super) sort_keys: bool,
    pub(super) ensure_ascii: bool,
}

impl JsonStyle {
    /// The defaults: `", "` and `": "` on one line, `","` between indented lines.
    pub(super) fn new(indent: Option<usize>) -> JsonStyle {
        JsonStyle {
            item_separator: if indent.is_some() { "," } else { ", " }.to_owned(),
            indent,
            key_separator: ": ".to_owned(),
            sort_keys: false,
            ensure_ascii: false,
        }
    }
}

/// The `tojson` filter of llama.cpp's engine, with Hugging Face's signature
/// `tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`: keys in
/// insertion order, non-ASCII kept, no HTML escaping, floats as C++ streams print them.
/// (`sort_keys`, which llama.cpp rejects, is supported.)
pub(super) fn tojson(
    value: &Value,
    args: minijinja::value::Rest<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let arg = |name: &str, position: usize| -> Result<Option<Value>, Error> {
        Ok(kwargs
            .get::<Option<Value>>(name)?
            .or_else(|| args.get(position).cloned())
            .filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let ensure_ascii = arg("ensure_ascii", 0)?.is_some_and(|v| v.is_true());
    // Only an integer indents; llama.cpp ignores anything else.
    let indent = arg("indent", 1)?
        .filter(Value::is_integer)
        .and_then(|v| i64::try_from(v).ok())
        .filter(|&n| n >= 0)
        .map(|n| n as usize);
    let mut style = JsonStyle::new(indent);
    style.ensure_ascii = ensure_ascii;
    if let Some(separators) = arg("separators", 2)? {
        let parts: Vec<Value> = separators.try_iter()?.collect();
        if let Some(item) = parts.first() {
            style.item_separator = item.to_string();
        }
        if let Some(key) = parts.get(1) {
            style.key_separator = key.to_string();
        }
    }
    style.sort_keys = arg("sort_keys", 3)?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    if args.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

pub(super) fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    level: usize,
) -> Result<(), Error> {
    if level > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value is nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                out.push_str(&cpp_float(f));
            }
        }
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style),
        ValueKind::Bytes => write_json_string(
            out,
            &String::from_utf8_lossy(value.as_bytes().unwrap_or_default()),
            style,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, style, level, '[', ']', &items, |out, item| {
                write_json(out, item, style, level + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.as_str() {
                    Some(s) => s.to_owned(),
                    None => key.to_string(),
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, level, '{', '}', &entries, |out, (key, item)| {
                write_json_string(out, key, style);
                out.push_str(&style.key_separator);
                write_json(out, item, style, level + 1)
            })?;
        }
        // None, undefined and values JSON cannot express (functions, objects) are `null`.
        _ => out.push_str("null"),
    }
    Ok(())
}

pub(super) fn write_container<T>(
    out: &mut String,
    style: &JsonStyle,
    level: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if !items.is_empty() {
        if style.indent.is_some() {
            out.push('\n');
        }
        let indent = style.indent.unwrap_or(0);
        for (i, item) in items.iter().enumerate() {
            out.push_str(&" ".repeat((level + 1) * indent));
            write_item(out, item)?;
            if i + 1 < items.len() {
                out.push_str(&style.item_separator);
            }
            if style.indent.is_some() {
                out.push('\n');
            }
        }
        out.push_str(&" ".repeat(level * indent));
    }
    out.push(close);
    Ok(())
}

pub(super) fn write_json_string(out: &mut String, s: &str, style: &JsonStyle) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if style.ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as C++'s `std::ostream << double` writes it (`%g`, six significant digits):
/// `1.0` is `1`, `0.1` is `0.1`, `1e20` is `1e+20`, `1234567.0` is `1.23457e+06`.
pub(super) fn cpp_float(f: f64) -> String {
    if f.is_nan() {
        return if f.is_sign_negative() { "-nan" } else { "nan" }.to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    const PRECISION: i32 = 6;
    // The exponent after rounding to six significant digits decides the notation.
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, f);
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s.to_owned()
        }
    };
    if (-4..PRECISION).contains(&exponent) {
        trim(&format!("{:.*}", (PRECISION - 1 - exponent) as usize, f))
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exponent.abs())
    }
}
