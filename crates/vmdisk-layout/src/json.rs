//! A JSON tree that keeps object members in document order and reports duplicate keys
//! (serde_json's `Value` silently keeps the last one).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, JsonPath, Result};

/// One JSON value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Json>),
    /// Members in document order; duplicates are kept so they can be reported.
    Obj(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> std::result::Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Json, E> {
        Ok(Json::Num(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Json, E> {
        Ok(Json::Num(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Json, E> {
        serde_json::Number::from_f64(v)
            .map(Json::Num)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Json, E> {
        Ok(Json::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Json, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Json::Arr(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Json, A::Error> {
        let mut out = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Json>()? {
            out.push((k, v));
        }
        Ok(Json::Obj(out))
    }
}

impl Json {
    pub(crate) fn parse(text: &str) -> Result<Json> {
        serde_json::from_str(text).map_err(Error::ParsingJson)
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Num(_) => "a number",
            Json::Str(_) => "a string",
            Json::Arr(_) => "an array",
            Json::Obj(_) => "an object",
        }
    }

    /// The members of an object, failing on duplicates (at any depth below too).
    pub(crate) fn members(&self, path: &JsonPath) -> Result<&[(String, Json)]> {
        match self {
            Json::Obj(m) => {
                for (i, (k, _)) in m.iter().enumerate() {
                    if m[..i].iter().any(|(k2, _)| k2 == k) {
                        return Err(Error::invalid(
                            &path.key(k),
                            "duplicate key (each name may appear once)",
                        ));
                    }
                }
                Ok(m)
            }
            other => Err(Error::invalid(
                path,
                format!("expected an object, found {}", other.kind()),
            )),
        }
    }

    /// Member `key` of an object (None when absent); `self` must be an object.
    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Member `key` as a string; absent or null give None.
    pub(crate) fn get_str(&self, key: &str, path: &JsonPath) -> Result<Option<&str>> {
        match self.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Str(s)) => Ok(Some(s)),
            Some(other) => Err(Error::invalid(
                &path.key(key),
                format!("expected a string, found {}", other.kind()),
            )),
        }
    }

    /// Member `key` as a list of strings; absent or null give an empty list.
    pub(crate) fn get_str_list(&self, key: &str, path: &JsonPath) -> Result<Vec<String>> {
        let p = path.key(key);
        match self.get(key) {
            None | Some(Json::Null) => Ok(Vec::new()),
            Some(Json::Arr(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Json::Str(s) => Ok(s.clone()),
                    other => Err(Error::invalid(
                        &p.index(i),
                        format!("expected a string, found {}", other.kind()),
                    )),
                })
                .collect(),
            Some(other) => Err(Error::invalid(
                &p,
                format!("expected a list of strings, found {}", other.kind()),
            )),
        }
    }

    /// Member `key` as an integer; absent or null give None.
    pub(crate) fn get_int(&self, key: &str, path: &JsonPath) -> Result<Option<i64>> {
        match self.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Num(n)) => n.as_i64().map(Some).ok_or_else(|| {
                Error::invalid(&path.key(key), format!("{n} is not a 64-bit integer"))
            }),
            Some(other) => Err(Error::invalid(
                &path.key(key),
                format!("expected an integer, found {}", other.kind()),
            )),
        }
    }

    /// Canonical text: object members sorted by key, duplicates kept in order. Used as the
    /// default seed, so it must never change for the same document.
    pub(crate) fn canonical(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => out.push_str(&n.to_string()),
            Json::Str(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
            Json::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.canonical(out);
                }
                out.push(']');
            }
            Json::Obj(m) => {
                let mut sorted: Vec<&(String, Json)> = m.iter().collect();
                sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                out.push('{');
                for (i, (k, v)) in sorted.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    v.canonical(out);
                }
                out.push('}');
            }
        }
    }
}
