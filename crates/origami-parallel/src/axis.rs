//! The five parallel axes and the order string that lays them out over ranks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ParallelError;

/// One axis of the rank grid. Both mappings use the same five names: the dense mapping has
/// `ep = 1`, the expert mapping has `cp = 1` and reads tp as etp and dp as edp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Tensor parallel (etp in the expert mapping).
    Tp,
    /// Context parallel (always 1 in the expert mapping).
    Cp,
    /// Expert parallel (always 1 in the dense mapping).
    Ep,
    /// Data parallel (edp in the expert mapping).
    Dp,
    /// Pipeline parallel, shared by both mappings.
    Pp,
}

impl Axis {
    /// Every axis, in the default order.
    pub const ALL: [Axis; 5] = [Axis::Tp, Axis::Cp, Axis::Ep, Axis::Dp, Axis::Pp];

    /// The axis name used in order strings, configs and logs.
    pub fn name(self) -> &'static str {
        match self {
            Axis::Tp => "tp",
            Axis::Cp => "cp",
            Axis::Ep => "ep",
            Axis::Dp => "dp",
            Axis::Pp => "pp",
        }
    }

    fn from_name(name: &str) -> Option<Axis> {
        Axis::ALL.into_iter().find(|axis| axis.name() == name)
    }
}

/// The order in which the axes vary over consecutive ranks, leftmost fastest (Megatron-Core's
/// order string, e.g. `tp-cp-ep-dp-pp`). Every axis appears exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Order([Axis; 5]);

impl Order {
    /// The axes, fastest-varying first.
    pub fn axes(&self) -> [Axis; 5] {
        self.0
    }

    /// Where `axis` stands in the order (0 = fastest varying).
    pub fn position(&self, axis: Axis) -> usize {
        self.0
            .iter()
            .position(|&a| a == axis)
            .expect("an Order holds every axis")
    }

    /// Whether pp is the slowest-varying axis, which makes dense and expert pipeline groups
    /// coincide whatever the other sizes are.
    pub fn ends_in_pp(&self) -> bool {
        self.0[4] == Axis::Pp
    }
}

impl Default for Order {
    /// `tp-cp-ep-dp-pp`, Megatron-Core's default.
    fn default() -> Self {
        Order(Axis::ALL)
    }
}

impl FromStr for Order {
    type Err = ParallelError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut axes = Vec::with_capacity(5);
        for name in text.split('-') {
            let axis = Axis::from_name(&name.trim().to_ascii_lowercase()).ok_or_else(|| {
                ParallelError::UnknownAxis {
                    order: text.to_string(),
                    name: name.to_string(),
                }
            })?;
            if axes.contains(&axis) {
                return Err(ParallelError::RepeatedAxis {
                    order: text.to_string(),
                    axis: axis.name(),
                });
            }
            axes.push(axis);
        }
        if let Some(missing) = Axis::ALL.into_iter().find(|axis| !axes.contains(axis)) {
            return Err(ParallelError::MissingAxis {
                order: text.to_string(),
                axis: missing.name(),
            });
        }
        Ok(Order(axes.try_into().expect("five distinct axes")))
    }
}

impl TryFrom<String> for Order {
    type Error = ParallelError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Order> for String {
    fn from(order: Order) -> String {
        order.to_string()
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|axis| axis.name()).collect();
        f.write_str(&names.join("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_documented_orders() {
        for text in ["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"] {
            assert_eq!(text.parse::<Order>().unwrap().to_string(), text);
        }
        assert_eq!(Order::default().to_string(), "tp-cp-ep-dp-pp");
    }

    #[test]
    fn rejects_unknown_repeated_and_missing_axes() {
        assert!(matches!(
            "tp-cp-xp-dp-pp".parse::<Order>(),
            Err(ParallelError::UnknownAxis { name, .. }) if name == "xp"
        ));
        assert!(matches!(
            "tp-tp-ep-dp-pp".parse::<Order>(),
            Err(ParallelError::RepeatedAxis { axis: "tp", .. })
        ));
        assert!(matches!(
            "tp-cp-dp-pp".parse::<Order>(),
            Err(ParallelError::MissingAxis { axis: "ep", .. })
        ));
    }
}
