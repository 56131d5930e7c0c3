//! AFL target `sip`: see [`sipedge_fuzz::sip`].

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sipedge_fuzz::sip(data);
    });
}
