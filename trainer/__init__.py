"""The compact LLaVA trainer: offline packing, model, data loader, training loop and export."""
