//! The planner's side in origami: the model as `origami-plan` sees it ([`shape`]) and the
//! `local` hardware description measured on this machine ([`calibrate`]).

pub mod calibrate;
pub mod shape;
