"""The admin listener: JSON API with actions, OpenAPI document, dashboard, metrics."""
