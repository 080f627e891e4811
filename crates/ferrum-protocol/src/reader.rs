//! Reading request fields out of parsed JSON with OpenAI's validation errors: each failure names
//! the parameter by its path (`messages[0].role`) and carries OpenAI's error code
//! (`invalid_type`, `decimal_above_max_value`, `missing_required_parameter`, ...).
//!
//! Hand-written rather than serde-derived: serde's errors name neither the path in OpenAI's
//! notation nor the codes clients (and the official SDKs' users) match on.

use serde_json::{Map, Value};

use crate::error::ApiError;

pub type Result<T> = std::result::Result<T, ApiError>;

/// The type of a JSON value, as OpenAI's messages name it.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn invalid_type(path: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid_param(
        path,
        "invalid_type",
        format!(
            "Invalid type for '{path}': expected {expected}, but got {} instead.",
            type_name(got)
        ),
    )
}

pub fn missing(path: &str) -> ApiError {
    ApiError::invalid_param(
        path,
        "missing_required_parameter",
        format!("Missing required parameter: '{path}'."),
    )
}

/// `Invalid value for 'path': 'x'. Supported values are: 'a', 'b', and 'c'.`
pub fn invalid_value(path: &str, got: &str, supported: &[&str]) -> ApiError {
    let quoted: Vec<String> = supported.iter().map(|s| format!("'{s}'")).collect();
    let list = match quoted.len() {
        0 => String::new(),
        1 => quoted[0].clone(),
        n => format!("{}, and {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    };
    ApiError::invalid_param(
        path,
        "invalid_value",
        format!("Invalid value for '{path}': '{got}'. Supported values are: {list}."),
    )
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// A JSON object being read, with its path for error messages.
pub struct Fields<'a> {
    pub map: &'a Map<String, Value>,
    pub path: String,
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>, path: impl Into<String>) -> Self {
        Fields {
            map,
            path: path.into(),
        }
    }

    /// The path of a member: `key` at top level, `prefix.key` below.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// A member; an explicit `null` counts as absent (the spec's fields are nullable).
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| missing(&self.path_of(key)))
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(invalid_type(&self.path_of(key), "a string", v)),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<&'a str> {
        self.str(key)?.ok_or_else(|| missing(&self.path_of(key)))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(invalid_type(&self.path_of(key), "a boolean", v)),
        }
    }

    pub fn object(&self, key: &str) -> Result<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Fields::new(m, self.path_of(key)))),
            Some(v) => Err(invalid_type(&self.path_of(key), "an object", v)),
        }
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(invalid_type(&self.path_of(key), "an array", v)),
        }
    }

    /// A number within `[min, max]`.
    pub fn decimal(&self, key: &str, min: f64, max: f64) -> Result<Option<f64>> {
        let path = self.path_of(key);
        let x = match self.get(key) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(v) => return Err(invalid_type(&path, "a decimal", v)),
        };
        if x < min {
            return Err(ApiError::invalid_param(
                &path,
                "decimal_below_min_value",
                format!(
                    "Invalid '{path}': decimal below minimum value. Expected a value >= {}, but \
                     got {} instead.",
                    fmt_num(min),
                    fmt_num(x)
                ),
            ));
        }
        if x > max {
            return Err(ApiError::invalid_param(
                &path,
                "decimal_above_max_value",
                format!(
                    "Invalid '{path}': decimal above maximum value. Expected a value <= {}, but \
                     got {} instead.",
                    fmt_num(max),
                    fmt_num(x)
                ),
            ));
        }
        Ok(Some(x))
    }

    /// An integer within `[min, max]` (a decimal with no fraction, like `5.0`, is accepted).
    pub fn integer(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>> {
        let path = self.path_of(key);
        let x = match self.get(key) {
            None => return Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => i,
                None => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => f as i64,
                    _ if n.is_u64() => i64::MAX,
                    _ => return Err(invalid_type(&path, "an integer", &Value::Number(n.clone()))),
                },
            },
            Some(v) => return Err(invalid_type(&path, "an integer", v)),
        };
        if x < min {
            return Err(ApiError::invalid_param(
                &path,
                "integer_below_min_value",
                format!(
                    "Invalid '{path}': integer below minimum value. Expected a value >= {min}, \
                     but got {x} instead."
                ),
            ));
        }
        if x > max {
            return Err(ApiError::invalid_param(
                &path,
                "integer_above_max_value",
                format!(
                    "Invalid '{path}': integer above maximum value. Expected a value <= {max}, \
                     but got {x} instead."
                ),
            ));
        }
        Ok(Some(x))
    }

    /// A string that must be one of `supported`.
    pub fn choice(&self, key: &str, supported: &[&'static str]) -> Result<Option<&'static str>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => supported
                .iter()
                .find(|c| **c == s)
                .copied()
                .map(Some)
                .ok_or_else(|| invalid_value(&self.path_of(key), s, supported)),
        }
    }

    /// Rejects members not in `known`, as OpenAI does for top-level request arguments.
    pub fn deny_unknown(&self, known: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(ApiError::invalid_request(format!(
                "Unrecognized request argument supplied: {k}"
            ))
            .with_code("unknown_parameter")),
        }
    }
}

/// Parses a request body into a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!(
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON: {e}.)"
        ))
    })?;
    match value {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::invalid_request(format!(
            "Invalid request body: expected a JSON object, but got {} instead.",
            type_name(&other)
        ))),
    }
}
