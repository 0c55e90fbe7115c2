//! Payout addresses: network detection and address to output script, on the `bitcoin` crate.

use std::str::FromStr;

pub use bitcoin::Network;

/// Why an address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    /// Not a valid address (bad checksum, bad encoding).
    #[error("invalid address")]
    Invalid,
    /// A valid address, but for another network.
    #[error("address is for another network")]
    WrongNetwork,
}

/// The network for a `getblockchaininfo` `chain` name (`main`, `test`, `testnet4`, `signet`, `regtest`).
pub fn network_from_chain(chain: &str) -> Option<Network> {
    match chain {
        "main" => Some(Network::Bitcoin),
        "test" => Some(Network::Testnet),
        "testnet4" => Some(Network::Testnet4),
        "signet" => Some(Network::Signet),
        "regtest" => Some(Network::Regtest),
        _ => None,
    }
}

/// The output script paying `addr` (P2PKH, P2SH, P2WPKH, P2WSH, P2TR) on `network`.
///
/// Base58 addresses with the test prefixes are valid on every test network (testnet3, testnet4,
/// signet and regtest); bech32 addresses must carry the network's own prefix (`tb` on testnets
/// and signet, `bcrt` on regtest).
pub fn script_for_address(addr: &str, network: Network) -> Result<Vec<u8>, AddressError> {
    let unchecked = match bitcoin::Address::from_str(addr) {
        Ok(a) => a,
        // Bech32 may be written all in upper case (BIP173, as QR codes do); the crate wants lower.
        Err(_) if !addr.bytes().any(|b| b.is_ascii_lowercase()) => {
            bitcoin::Address::from_str(&addr.to_ascii_lowercase())
                .map_err(|_| AddressError::Invalid)?
        }
        Err(_) => return Err(AddressError::Invalid),
    };
    let checked = unchecked
        .require_network(network)
        .map_err(|_| AddressError::WrongNetwork)?;
    Ok(checked.script_pubkey().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::address::KnownHrp;
    use bitcoin::hashes::Hash;
    use bitcoin::{Address, PubkeyHash, Script, WitnessProgram, WitnessVersion};

    const ALL: [Network; 5] = [
        Network::Bitcoin,
        Network::Testnet,
        Network::Testnet4,
        Network::Signet,
        Network::Regtest,
    ];

    /// Addresses of every kind on `network`, with the scripts they must give.
    fn addresses(network: Network) -> Vec<(String, Vec<u8>)> {
        let hrp = KnownHrp::from(network);
        let redeem = Script::from_bytes(&[0x51]);
        let list = [
            Address::p2pkh(PubkeyHash::from_byte_array([3; 20]), network),
            Address::p2sh(redeem, network).unwrap(),
            Address::from_witness_program(
                WitnessProgram::new(WitnessVersion::V0, &[4; 20]).unwrap(),
                hrp,
            ),
            Address::p2wsh(redeem, hrp),
            Address::from_witness_program(
                WitnessProgram::new(WitnessVersion::V1, &[5; 32]).unwrap(),
                hrp,
            ),
        ];
        list.iter()
            .map(|a| (a.to_string(), a.script_pubkey().to_bytes()))
            .collect()
    }

    #[test]
    fn chains() {
        assert_eq!(network_from_chain("main"), Some(Network::Bitcoin));
        assert_eq!(network_from_chain("test"), Some(Network::Testnet));
        assert_eq!(network_from_chain("testnet4"), Some(Network::Testnet4));
        assert_eq!(network_from_chain("signet"), Some(Network::Signet));
        assert_eq!(network_from_chain("regtest"), Some(Network::Regtest));
        assert_eq!(network_from_chain("bitcoin"), None);
        assert_eq!(network_from_chain(""), None);
    }

    #[test]
    fn known_vectors() {
        let cases = [
            // Genesis coinbase P2PKH.
            (
                "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa",
                Network::Bitcoin,
                "76a91462e907b15cbf27d5425399ebf6f0fb50ebb88f1888ac",
            ),
            // BIP173 P2WPKH.
            (
                "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",
                Network::Bitcoin,
                "0014751e76e8199196d454941c45d1b3a323f1433bd6",
            ),
            // BIP173 P2WSH on testnet.
            (
                "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
                Network::Testnet,
                "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262",
            ),
            // BIP350 P2TR.
            (
                "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
                Network::Bitcoin,
                "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
            ),
        ];
        for (addr, network, script) in cases {
            assert_eq!(
                hex::encode(script_for_address(addr, network).unwrap()),
                script,
                "{addr}"
            );
        }
    }

    #[test]
    fn every_kind_on_every_network() {
        for network in ALL {
            for (addr, script) in addresses(network) {
                assert_eq!(
                    script_for_address(&addr, network),
                    Ok(script),
                    "{addr} {network:?}"
                );
            }
        }
    }

    #[test]
    fn base58_test_prefixes_work_on_all_test_networks() {
        for (addr, script) in addresses(Network::Testnet).into_iter().take(2) {
            for network in [
                Network::Testnet,
                Network::Testnet4,
                Network::Signet,
                Network::Regtest,
            ] {
                assert_eq!(
                    script_for_address(&addr, network),
                    Ok(script.clone()),
                    "{addr}"
                );
            }
            assert_eq!(
                script_for_address(&addr, Network::Bitcoin),
                Err(AddressError::WrongNetwork)
            );
        }
        // tb1 is shared by testnets and signet, but not regtest.
        let (tb, script) = addresses(Network::Signet).swap_remove(2);
        assert!(tb.starts_with("tb1"));
        assert_eq!(script_for_address(&tb, Network::Testnet), Ok(script));
        assert_eq!(
            script_for_address(&tb, Network::Regtest),
            Err(AddressError::WrongNetwork)
        );
        let (bcrt, _) = addresses(Network::Regtest).swap_remove(3);
        assert!(bcrt.starts_with("bcrt1"));
        assert_eq!(
            script_for_address(&bcrt, Network::Signet),
            Err(AddressError::WrongNetwork)
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            script_for_address("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNb", Network::Bitcoin),
            Err(AddressError::Invalid)
        );
        assert_eq!(
            script_for_address(
                "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj1",
                Network::Bitcoin
            ),
            Err(AddressError::Invalid)
        );
        assert_eq!(
            script_for_address("", Network::Bitcoin),
            Err(AddressError::Invalid)
        );
        assert_eq!(
            script_for_address("not an address", Network::Regtest),
            Err(AddressError::Invalid)
        );
        assert_eq!(
            script_for_address("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa", Network::Regtest),
            Err(AddressError::WrongNetwork)
        );
        assert_eq!(
            script_for_address(
                "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",
                Network::Regtest
            ),
            Err(AddressError::WrongNetwork)
        );
    }
}
