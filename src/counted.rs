//! Counting what a serde input holds, keeping nothing, so that a limit is
//! checked before a decode that would keep it all: serde_yaml_ng's
//! expansion of a config's aliases, kube-core's `request.options` and
//! `request.userInfo`.

use std::cell::Cell;
use std::fmt;

use serde::de::{
    DeserializeSeed, EnumAccess, Error, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// What may still be read: values (a map's keys among them) and bytes of
/// text.
pub struct Budget {
    values: Cell<usize>,
    bytes: Cell<usize>,
    exceeded: Cell<bool>,
}

impl Budget {
    pub fn new(values: usize, bytes: usize) -> Self {
        Self {
            values: Cell::new(values),
            bytes: Cell::new(bytes),
            exceeded: Cell::new(false),
        }
    }

    /// Whether a read failed for going past the budget, rather than for
    /// the input's own error.
    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    fn spend<E: Error>(&self, bytes: usize) -> Result<(), E> {
        match (
            self.values.get().checked_sub(1),
            self.bytes.get().checked_sub(bytes),
        ) {
            (Some(values), Some(bytes)) => {
                self.values.set(values);
                self.bytes.set(bytes);
                Ok(())
            }
            _ => {
                self.exceeded.set(true);
                Err(E::custom("past the budget"))
            }
        }
    }
}

/// Reads any value, counting it and everything in it against a [`Budget`];
/// fails past it.
#[derive(Clone, Copy)]
pub struct Count<'a>(pub &'a Budget);

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any value")
    }

    fn visit_bool<E: Error>(self, _: bool) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_i64<E: Error>(self, _: i64) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_u64<E: Error>(self, _: u64) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_i128<E: Error>(self, _: i128) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_u128<E: Error>(self, _: u128) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_f64<E: Error>(self, _: f64) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_str<E: Error>(self, text: &str) -> Result<(), E> {
        self.0.spend(text.len())
    }

    fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<(), E> {
        self.0.spend(bytes.len())
    }

    fn visit_unit<E: Error>(self) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_none<E: Error>(self) -> Result<(), E> {
        self.0.spend(0)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        self.0.spend(0)?;
        while items.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        self.0.spend(0)?;
        while entries.next_key_seed(self)?.is_some() {
            entries.next_value_seed(self)?;
        }
        Ok(())
    }

    // A YAML value with a tag of its own (`!foo …`): the tag, then the value.
    fn visit_enum<A: EnumAccess<'de>>(self, tagged: A) -> Result<(), A::Error> {
        let (_, value) = tagged.variant::<IgnoredAny>()?;
        value.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(json: &str, values: usize, bytes: usize) -> (bool, bool) {
        let budget = Budget::new(values, bytes);
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let read = Count(&budget).deserialize(&mut deserializer).is_ok();
        (read, budget.exceeded())
    }

    #[test]
    fn every_value_and_key_and_byte_of_text_counts() {
        // The map, its key "a", the list, 1, "xy": 5 values, 3 bytes.
        let json = r#"{"a": [1, "xy"]}"#;
        assert_eq!(count(json, 5, 3), (true, false));
        assert_eq!(count(json, 4, 3), (false, true));
        assert_eq!(count(json, 5, 2), (false, true));
        // Not JSON: an error, but not the budget's.
        assert_eq!(count("[1,", 100, 100), (false, false));
    }
}
