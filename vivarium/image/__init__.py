"""The guest image: what goes in (recipe) and how it is made (build)."""
