//! bitlinear
