"""Billing API: FastAPI app serving billing-cycle meter reads."""
