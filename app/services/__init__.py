"""Service layer: the logic behind the API routes (views stay thin)."""
