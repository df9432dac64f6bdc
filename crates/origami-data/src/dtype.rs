//! Token element types of Megatron's indexed dataset and their codes in the `.idx` header:
//! 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16.
//! Token streams use uint16 when the vocabulary has fewer than 65500 entries, else int32.

/// An element type of the `.bin` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDtype {
    /// Code 1.
    U8,
    /// Code 2.
    I8,
    /// Code 3.
    I16,
    /// Code 4.
    I32,
    /// Code 5.
    I64,
    /// Code 6.
    F64,
    /// Code 7.
    F32,
    /// Code 8.
    U16,
}

impl TokenDtype {
    /// The type of a header code, if the code is known.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => TokenDtype::U8,
            2 => TokenDtype::I8,
            3 => TokenDtype::I16,
            4 => TokenDtype::I32,
            5 => TokenDtype::I64,
            6 => TokenDtype::F64,
            7 => TokenDtype::F32,
            8 => TokenDtype::U16,
            _ => return None,
        })
    }

    /// The header code.
    pub fn code(self) -> u8 {
        match self {
            TokenDtype::U8 => 1,
            TokenDtype::I8 => 2,
            TokenDtype::I16 => 3,
            TokenDtype::I32 => 4,
            TokenDtype::I64 => 5,
            TokenDtype::F64 => 6,
            TokenDtype::F32 => 7,
            TokenDtype::U16 => 8,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U8 | TokenDtype::I8 => 1,
            TokenDtype::I16 | TokenDtype::U16 => 2,
            TokenDtype::I32 | TokenDtype::F32 => 4,
            TokenDtype::I64 | TokenDtype::F64 => 8,
        }
    }

    /// The type Megatron picks for a vocabulary of `vocab_size` tokens.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size < 65500 {
            TokenDtype::U16
        } else {
            TokenDtype::I32
        }
    }

    /// Reads element `bytes` (little-endian, `size()` bytes) as a token id, if it is one.
    pub fn decode(self, bytes: &[u8]) -> Option<u32> {
        let value: i128 = match self {
            TokenDtype::U8 => bytes[0] as i128,
            TokenDtype::I8 => bytes[0] as i8 as i128,
            TokenDtype::I16 => i16::from_le_bytes([bytes[0], bytes[1]]) as i128,
            TokenDtype::U16 => u16::from_le_bytes([bytes[0], bytes[1]]) as i128,
            TokenDtype::I32 => i32::from_le_bytes(bytes[..4].try_into().ok()?) as i128,
            TokenDtype::I64 => i64::from_le_bytes(bytes[..8].try_into().ok()?) as i128,
            TokenDtype::F32 | TokenDtype::F64 => return None,
        };
        u32::try_from(value).ok()
    }

    /// Writes token `id` in this type; `None` if it does not fit.
    pub fn encode(self, id: u32, out: &mut Vec<u8>) -> Option<()> {
        match self {
            TokenDtype::U8 => out.push(u8::try_from(id).ok()?),
            TokenDtype::I8 => out.extend(i8::try_from(id).ok()?.to_le_bytes()),
            TokenDtype::I16 => out.extend(i16::try_from(id).ok()?.to_le_bytes()),
            TokenDtype::U16 => out.extend(u16::try_from(id).ok()?.to_le_bytes()),
            TokenDtype::I32 => out.extend(i32::try_from(id).ok()?.to_le_bytes()),
            TokenDtype::I64 => out.extend((id as i64).to_le_bytes()),
            TokenDtype::F32 | TokenDtype::F64 => return None,
        }
        Some(())
    }
}
