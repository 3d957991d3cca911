"""Everything that turns ``Findings`` plus source datasets into DICOM objects."""
