//! criterion benchmarks for skiff; the benchmarks live in `benches/`.
