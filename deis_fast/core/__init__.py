"""The core: the float64 math (schedules, grids, coefficients), the plan and its executor, the model adapters
(prediction types, guidance) and the one combine op. Imports nothing above it (only ``deis_fast.kernels``)."""
