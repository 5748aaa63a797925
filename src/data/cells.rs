//! Owns Arrow values as JSON (`json_values`): a Parquet column of lists and structs (a
//! `messages` conversation) read as the JSON a JSONL file would hold.
//! Layer: data — may import the ground, linalg, backend and model; no sibling.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::Array;
use arrow_schema::DataType;

/// Row `i` of `a` as JSON: strings, integers, floats, booleans, nulls, lists, structs and
/// maps; `Err` names a type that has no JSON form here.
pub fn json_value(a: &dyn Array, i: usize) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    if a.is_null(i) {
        return Ok(J::Null);
    }
    macro_rules! num {
        ($t:ty) => {
            J::from(a.as_primitive::<$t>().value(i))
        };
    }
    Ok(match a.data_type() {
        DataType::Null => J::Null,
        DataType::Boolean => J::Bool(a.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => num!(Float32Type),
        DataType::Float64 => num!(Float64Type),
        DataType::Utf8 => J::from(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => J::from(a.as_string::<i64>().value(i)),
        DataType::Utf8View => J::from(a.as_string_view().value(i)),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(a.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut obj = serde_json::Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                obj.insert(f.name().clone(), json_value(col.as_ref(), i)?);
            }
            J::Object(obj)
        }
        DataType::Map(_, _) => {
            let entries = a.as_map().value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            let mut obj = serde_json::Map::new();
            for k in 0..entries.len() {
                let key = match json_value(keys.as_ref(), k)? {
                    J::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key, json_value(values.as_ref(), k)?);
            }
            J::Object(obj)
        }
        other => return Err(format!("type {other} has no JSON form")),
    })
}

fn list(a: &dyn Array) -> Result<serde_json::Value, String> {
    (0..a.len())
        .map(|k| json_value(a, k))
        .collect::<Result<Vec<_>, _>>()
        .map(serde_json::Value::Array)
}
