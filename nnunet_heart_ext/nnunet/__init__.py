"""The nnU-Net plug-ins: what nnU-Net's own commands find by name or through the import hook
(`registry`, `planners`, `preprocessing`, `normalization`, `resampling`, `postprocessing`,
`predictor`, `prediction_export`, `validation`; how the hook's wrappers are installed:
`patching`; faults of the extension's code falling back to nnU-Net's: `fallback`) and the
ensemble prediction built on nnU-Net's predictor (`ensemble_predict`). Adapters around the
kernels (nnunet_heart_ext.kernels): nnU-Net's signatures and defaults here, the array code there.

Importing this package imports nothing (nnunetv2 comes with the modules that need it).
"""
