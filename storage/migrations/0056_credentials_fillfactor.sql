-- 0056: a replay-window update stays on its row's page (a HOT update).
--
-- Every OSCORE uplink moves its context's replay window (oscore_replay_index/bits,
-- `storage.credentials.save_replay_windows`). Neither column is indexed, so the update
-- can be HOT: the new row version goes on the same page and none of the table's five
-- indexes gets an entry, provided the page has room. Provisioning fills pages to the
-- brim (one meter's row after the other), so without room every first update of the day
-- moved its row to another page and inserted into all five indexes. At 70 % a page keeps
-- room for the day's new versions of its rows; the old ones are pruned as the page is
-- next touched. Measured on 200,000 contexts (500 uplinks per transaction, the window
-- update and the recorded answer): 25 -> 20 µs of PostgreSQL CPU per uplink.
--
-- Pages written before this keep no room until rewritten: a row updated there moves to a
-- new page, which is then filled to 70 %, so a table converges within a reporting cycle
-- (or at once, off-hours, with VACUUM FULL device_credentials).

ALTER TABLE device_credentials SET (fillfactor = 70);
