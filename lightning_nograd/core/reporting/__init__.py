"""What a finding is and says, the report that holds findings and measurements, and the end-of-stage table."""
