"""The billing core, sans-I/O: the rules that turn stored readings into billing reads.

Readings in (int mL, aware UTC datetimes), reads, rows and findings out; no database,
network, clock or logging, numpy and the standard library only (and decoder's flag
constants). storage/ fetches the rows and calls these rules; api/ renders their results
in m3, once; simulator/ uses the same conversion.

    units        the one mL <-> m3 conversion, register unit and range, negative registers
    quality      ESPI QualityOfReading codes as one table, and "13 = mixed"
    consumption  consumption between two registers: the rollover rule, max plausible flow
    boundary     the register at a cycle boundary (actual, interpolated, estimated, ...)
    cycle        a meter's cycle row from its boundary reads; the publication rule
    vee          VEE checks of a cycle: rollover, reverse flow, spikes, gaps, alarms
    localtime    local-time calendar math: cycle bounds, DST-correct step boundaries

Where a rule must also run set-wise in SQL for the export's speed (`nbm_boundary_read`,
`nbm_consumption`, storage.billing's rendering), each SQL twin names its Python twin here
and tests/api/test_boundary_twin.py holds the two equal.
"""
