//! The one on/off type: `--ksm on`, `ksm = "off"` or `ksm = false` in an
//! instance file, `ro=on` in a device option, `"ksm": "on"` in the API.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected on or off, got {0:?}")]
pub struct OnOffError(pub String);

impl OnOff {
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

impl From<bool> for OnOff {
    fn from(on: bool) -> Self {
        if on {
            Self::On
        } else {
            Self::Off
        }
    }
}

impl From<OnOff> for bool {
    fn from(v: OnOff) -> bool {
        v.is_on()
    }
}

/// `on`/`off`, and `true`/`false` as TOML and JSON spell booleans; nothing
/// else (`yes`, `1`), so that every place accepts the same words.
impl FromStr for OnOff {
    type Err = OnOffError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" | "true" => Ok(OnOff::On),
            "off" | "false" => Ok(OnOff::Off),
            _ => Err(OnOffError(s.to_owned())),
        }
    }
}

impl fmt::Display for OnOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// A boolean or one of the words above.
impl<'de> Deserialize<'de> for OnOff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = OnOff;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("on or off (or true/false)")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<OnOff, E> {
                Ok(v.into())
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OnOff, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct T {
        v: OnOff,
    }

    #[test]
    fn words_and_booleans() {
        for (s, want) in [("on", OnOff::On), ("true", OnOff::On), ("off", OnOff::Off)] {
            assert_eq!(s.parse(), Ok(want));
        }
        for bad in ["yes", "1", "ON", ""] {
            assert_eq!(bad.parse::<OnOff>(), Err(OnOffError(bad.into())));
        }
        let t: T = toml::from_str("v = false").unwrap();
        assert_eq!(t.v, OnOff::Off);
        let t: T = toml::from_str("v = \"on\"").unwrap();
        assert_eq!(t.v, OnOff::On);
        let e = toml::from_str::<T>("v = \"yes\"").unwrap_err();
        assert!(e.message().contains("expected on or off"), "{e}");
        assert!(toml::from_str::<T>("v = 1").is_err());
        assert_eq!(serde_json::to_string(&OnOff::On).unwrap(), "\"on\"");
        let j: T = serde_json::from_str(r#"{"v":"off"}"#).unwrap();
        assert_eq!(j.v, OnOff::Off);
    }
}
