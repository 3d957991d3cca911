"""Everything that turns a volume plus clinical context into ``Findings``."""
