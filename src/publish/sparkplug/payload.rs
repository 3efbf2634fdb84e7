//! The Sparkplug B payload as protobuf messages, defined with prost's derive
//! macros and the field numbers of the Sparkplug B specification (Eclipse
//! Sparkplug 3.0, its `sparkplug_b.proto`; proto2, every scalar optional), and
//! the few builders the edge node needs.
//!
//! Only what ganomalyd sends or reads is defined: `Payload` (timestamp 1,
//! metrics 2, seq 3, uuid 4, body 5) and `Metric` (name 1, alias 2,
//! timestamp 3, datatype 4, is_historical 5, is_transient 6, is_null 7,
//! int_value 10, long_value 11, float_value 12, double_value 13,
//! boolean_value 14, string_value 15, bytes_value 16). Metadata (8),
//! properties (9), data sets (17), templates (18) and extensions are not
//! used; prost skips them when decoding a command that carries them.
//! The field numbers were checked against the descriptor of the generated
//! code that pysparkplug ships (`tests/sparkplug.rs` decodes with it).

/// One Sparkplug message body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// When the message was made, ms since the Unix epoch (UTC).
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0–255; absent only in NDEATH.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric. The value is one of the `*_value` fields, chosen by the
/// datatype (a protobuf `oneof` in the specification: at most one is set).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// When the value was taken, ms since the Unix epoch.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`] value.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    /// Buffered, not current: a host stores it in history without updating the tag.
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(uint32, optional, tag = "10")]
    pub int_value: Option<u32>,
    #[prost(uint64, optional, tag = "11")]
    pub long_value: Option<u64>,
    #[prost(float, optional, tag = "12")]
    pub float_value: Option<f32>,
    #[prost(double, optional, tag = "13")]
    pub double_value: Option<f64>,
    #[prost(bool, optional, tag = "14")]
    pub boolean_value: Option<bool>,
    #[prost(string, optional, tag = "15")]
    pub string_value: Option<String>,
    #[prost(bytes = "vec", optional, tag = "16")]
    pub bytes_value: Option<Vec<u8>>,
}

/// The Sparkplug datatypes ganomalyd uses, with the specification's enum
/// values (the basic types are 1–14: Int8 1 … UInt64 8, Float 9, Double 10,
/// Boolean 11, String 12, DateTime 13, Text 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DataType {
    Int64 = 4,
    UInt32 = 7,
    UInt64 = 8,
    Double = 10,
    Boolean = 11,
    String = 12,
}

/// A metric's value, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int64(i64),
    UInt64(u64),
    Double(f64),
    Boolean(bool),
    String(String),
    /// No value yet (`is_null`), of this type.
    Null(DataType),
}

impl Value {
    pub fn datatype(&self) -> DataType {
        match self {
            Value::Int64(_) => DataType::Int64,
            Value::UInt64(_) => DataType::UInt64,
            Value::Double(_) => DataType::Double,
            Value::Boolean(_) => DataType::Boolean,
            Value::String(_) => DataType::String,
            Value::Null(t) => *t,
        }
    }
}

/// How a metric goes into a message: births carry the datatype (the
/// specification requires it there), data messages do not (it "SHOULD NOT"
/// be repeated: a host has it from the birth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Birth,
    Data,
}

impl Metric {
    /// A named metric (ganomalyd uses no aliases, so every metric carries its name).
    pub fn new(name: &str, timestamp: u64, value: Value, form: Form) -> Metric {
        let mut m = Metric {
            name: Some(name.to_string()),
            timestamp: Some(timestamp),
            datatype: (form == Form::Birth).then_some(value.datatype() as u32),
            ..Metric::default()
        };
        match value {
            // Int64 travels as its two's complement in the uint64 field.
            Value::Int64(v) => m.long_value = Some(v as u64),
            Value::UInt64(v) => m.long_value = Some(v),
            Value::Double(v) => m.double_value = Some(v),
            Value::Boolean(v) => m.boolean_value = Some(v),
            Value::String(v) => m.string_value = Some(v),
            Value::Null(_) => m.is_null = Some(true),
        }
        m
    }

    /// Marks the value as buffered (sent after an outage), not current.
    pub fn historical(mut self, historical: bool) -> Metric {
        if historical {
            self.is_historical = Some(true);
        }
        self
    }
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Payload, prost::DecodeError> {
        <Payload as prost::Message>::decode(bytes)
    }

    /// The metric called `name`, if any.
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name.as_deref() == Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a hand-encoded metric, field by field, as protobuf's wire
    /// format lays them out: (field << 3 | wire type), then the value. A field
    /// number off by one would change these bytes.
    #[test]
    fn field_numbers_are_the_specifications() {
        let m = Metric::new("a", 5, Value::Boolean(true), Form::Birth).historical(true);
        let p = Payload { timestamp: Some(7), metrics: vec![m], seq: Some(3), ..Payload::default() };
        let bytes = p.encode();
        // Payload.timestamp = 1 (varint), .metrics = 2 (length-delimited), .seq = 3 (varint).
        assert_eq!(&bytes[..2], &[1 << 3, 7]);
        assert_eq!(bytes[2], 2 << 3 | 2);
        let len = bytes[3] as usize;
        let metric = &bytes[4..4 + len];
        // name 1 "a", timestamp 3 = 5, datatype 4 = 11 (Boolean), is_historical 5, boolean_value 14.
        assert_eq!(metric, &[1 << 3 | 2, 1, b'a', 3 << 3, 5, 4 << 3, 11, 5 << 3, 1, 14 << 3, 1]);
        assert_eq!(&bytes[4 + len..], &[3 << 3, 3]);
        assert_eq!(Payload::decode(&bytes).unwrap(), p);
    }

    #[test]
    fn values_go_in_the_fields_of_their_types() {
        let t = 1;
        let m = |v| Metric::new("m", t, v, Form::Birth);
        let i = m(Value::Int64(-1));
        assert_eq!((i.datatype, i.long_value), (Some(4), Some(u64::MAX)));
        let u = m(Value::UInt64(9));
        assert_eq!((u.datatype, u.long_value), (Some(8), Some(9)));
        let d = m(Value::Double(0.5));
        assert_eq!((d.datatype, d.double_value), (Some(10), Some(0.5)));
        let s = m(Value::String("x".into()));
        assert_eq!((s.datatype, s.string_value.as_deref()), (Some(12), Some("x")));
        let n = m(Value::Null(DataType::Double));
        assert_eq!((n.datatype, n.is_null, n.double_value), (Some(10), Some(true), None));
        let data = Metric::new("m", t, Value::Double(1.0), Form::Data);
        assert_eq!(data.datatype, None, "data messages leave the datatype to the birth");
    }

    #[test]
    fn unknown_fields_of_a_command_are_skipped() {
        // A metric with properties (field 9, a message) and metadata (8) from a host.
        let mut bytes = Payload { timestamp: Some(1), seq: Some(0), ..Payload::default() }.encode();
        let metric = [1 << 3 | 2, 1, b'x', 9 << 3 | 2, 0, 8 << 3 | 2, 0, 14 << 3, 1];
        bytes.extend_from_slice(&[2 << 3 | 2, metric.len() as u8]);
        bytes.extend_from_slice(&metric);
        let p = Payload::decode(&bytes).unwrap();
        assert_eq!(p.metric("x").and_then(|m| m.boolean_value), Some(true));
    }
}
